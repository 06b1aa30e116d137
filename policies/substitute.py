"""Importance-driven expert substitution (arXiv 2508.18983): an unimportant miss is served by the most
similar resident expert instead of waiting for its copy."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies import _lossy
from policies.base import Policy, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest
from traces.schema import ModelSpec


class SubstituteParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="a missing expert whose share of the token's routing weight is below it is substituted; 0: never")
    similarity: Literal["coactivation", "probs", "weights"] = Field(
        "coactivation", description="what is compared by cosine: co-activation profiles, router-probability profiles, or the experts' weights"
    )
    min_similarity: float = Field(0.0, ge=0.0, lt=1.0, description="a substitute must be more similar than this")
    evict: Literal["lfu", "lru"] = Field("lfu", description="replacement: keep the most reused experts (lfu) or the most recent")


@register("substitute")
class Substitute(Policy):
    """A routed expert that is not resident and whose routing weight is below `threshold` (as a
    share of its token's routed weight) is replaced, for that token, by the most similar resident
    expert of the same layer, with the same weight; important misses (share >= threshold) are loaded.

    Why: a miss costs a transfer (milliseconds over PCIe) while a low-weight expert contributes
    little to the token's output, and a similar expert that is already on the GPU reproduces much of
    that little; the paper reports -48% decode latency.

    Similarity: a cosine, from one of three sources. The first two are profiles accumulated from
    every request the policy has seen before this one (the router's choice, in both engines alike):

    - `coactivation` (default; works on every trace): expert e's profile is its row of the layer's
      co-activation counts (token rows routed to both e and f; the diagonal counts e's own rows), so
      two experts are similar when they are chosen together with the same experts;
    - `probs`: e's profile is the sum of the router's probability vectors of the rows routed to e
      (needs the trace field `probs`): experts the router scores alike for the same tokens;
    - `weights`: the cosine of the two experts' weights (all their parameters, flattened and
      concatenated), fixed for the run: the model spec's `expert_similarity`, which the runtime
      computes from its slow tier in float64 and `runtime.record` writes into the trace header, so a
      replay hands the policy the very numbers the recorded run used. A model spec without it
      (a trace recorded before it existed, an import, a preset) is refused at `reset`.

    A substitute must score above `min_similarity` (so an expert never seen together with any
    resident one is loaded, not replaced by an arbitrary one; with `weights`, experts whose weights
    are orthogonal or opposed never stand in for each other) and is never an expert the token
    already runs; among those, the most similar wins, ties to the lower expert id, whatever the
    source. An expert some token needs as important is loaded, and then serves every token. If the
    layer has no resident expert that qualifies, the miss is loaded.

    Scheduling: the resident experts (substitutes included) run first while the misses load;
    victims keep the experts most often reused (`evict=lfu`: fewest uses since the start, ties
    least recent; `lru` as an alternative).
    """

    Params = SubstituteParams
    lossless = False

    def __init__(self, params: BaseModel | None = None, **kwargs: object):
        super().__init__(params, **kwargs)
        source = self.params.similarity  # type: ignore[attr-defined]
        if source == "probs":
            self.uses = frozenset({"probs"})  # type: ignore[misc]
        elif source == "weights":  # a header item: the runtime computes it only when asked
            self.uses = frozenset({"expert_similarity"})  # type: ignore[misc]

    def reset(self, model: ModelSpec, cache, costs, future=None) -> None:  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        source = self.params.similarity  # type: ignore[attr-defined]
        self.weight_similarity: np.ndarray | None = None
        self.stats: _lossy.CoActivation | None = None
        if source == "weights":
            if model.expert_similarity is None:
                raise PolicySpecError(
                    f"policy {self.spec!r} needs the experts' weight similarity (model.expert_similarity), which the "
                    f"model spec of {model.name!r} does not carry: record the trace with python -m runtime.record"
                )
            self.weight_similarity = np.asarray(model.expert_similarity, dtype=np.float64)
        else:
            self.stats = _lossy.CoActivation(model.num_moe_layers, model.num_experts, probs=source == "probs")

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return _lossy.victim(self.params.evict, cache, part, exclude)  # type: ignore[attr-defined]

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        p: SubstituteParams = self.params  # type: ignore[assignment]
        topk = weights = None
        mass = 0.0
        if p.threshold > 0:
            shares = _lossy.token_shares(req.weights)
            layer, use_probs, stats, fixed = req.layer, p.similarity == "probs", self.stats, self.weight_similarity
            topk, weights, mass = _lossy.substitute_slots(
                req, cache,
                eligible=lambda t, j: bool(shares[t, j] < p.threshold),
                score=(lambda e: fixed[layer, e]) if fixed is not None else (lambda e: stats.cosine(layer, e, use_probs)),  # type: ignore[union-attr]
                min_score=p.min_similarity,
            )
        plan = _lossy.plan_assignment(self, req, cache, topk, weights, substituted=mass)
        if self.stats is not None:
            self.stats.add(req)
        return plan
