"""BuddyMoE (Wang et al., "BuddyMoE: Exploiting Expert Redundancy to Accelerate Memory-Constrained
Mixture-of-Experts Inference", arXiv 2511.10054): when the look-ahead prefetch missed, a resident
buddy expert stands in instead of a copy on demand."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from policies import _lossy
from policies.base import Policy, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest
from traces.schema import ModelSpec


class BuddyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    budget: int = Field(2, ge=0, le=1024, description="experts of the next layer prefetched per layer call")
    threshold: float = Field(1.0, ge=0.0, le=1.0, description="a prefetch miss is substituted only if its share of the token's weight is below it; 0: never")
    evict: Literal["lru", "lfu"] = Field("lru", description="replacement: least recently or least frequently used")


@register("buddy")
class Buddy(Policy):
    """Look-ahead prefetch, and on a prefetch miss a buddy instead of a stall.

    Prefetch: at every layer call, the experts the request's `lookahead` predicts for the next MoE
    layer (all tokens, most predicted first) that are not resident are prefetched, up to `budget`.

    Prefetch miss: a layer call is *covered* when the policy's previous call was the previous MoE
    layer of the same step and made a prediction for this one. In a covered call, every routed
    expert that is not resident is a prefetch miss: the prefetcher guessed wrong, or the budget or
    an eviction left it out. Such a miss is served, for each of its tokens, by its buddy, the
    resident expert of the layer most often routed together with it so far (co-activation counts
    of the requests seen before, the router's choice; ties lower id; never an expert the token
    already runs; a count of 0 is no buddy), when its share of the token's routed weight is below
    `threshold` (default 1.0: any but a token's only expert). Misses of uncovered calls (the first
    MoE layer of a step), misses without a buddy, and experts some token needs above the threshold
    are loaded on demand. BuddyMoE profiles buddies offline on a calibration set; here they are
    learnt online from the run itself, which is what both engines can do alike.

    Why: in the paper, stalls on prefetch misses dominate offloaded decoding, and a functionally
    similar expert already on the GPU costs a small accuracy loss instead of a PCIe transfer.
    """

    Params = BuddyParams
    lossless = False
    uses = frozenset({"lookahead"})
    lookahead_depth = 1

    def reset(self, model: ModelSpec, cache, costs, future=None) -> None:  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.stats = _lossy.CoActivation(model.num_moe_layers, model.num_experts)
        self._predicted: tuple[int, int] | None = None  # (step, layer) the last call predicted for

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return _lossy.victim(self.params.evict, cache, part, exclude)  # type: ignore[attr-defined]

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        p: BuddyParams = self.params  # type: ignore[assignment]
        covered = self._predicted == (req.step, req.layer)
        topk = weights = None
        mass = 0.0
        if covered and p.threshold > 0:
            shares = _lossy.token_shares(req.weights)
            layer = req.layer
            topk, weights, mass = _lossy.substitute_slots(
                req, cache,
                eligible=lambda t, j: bool(shares[t, j] < p.threshold),
                score=lambda e: self.stats.coactivated(layer, e),
                min_score=0.0,
            )
        plan = _lossy.plan_assignment(self, req, cache, topk, weights, substituted=mass)
        predicted = _lossy.prefetch_next(self, req, cache, plan, p.budget)
        self._predicted = (req.step, req.layer + 1) if predicted else None
        self.stats.add(req)
        return plan
