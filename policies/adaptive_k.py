"""Adaptive top-k gating from AdapMoE (Zhong et al., ICCAD 2024, arXiv 2408.10284): a token whose
router is confident in its first expert runs that expert alone."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.base import Modifier, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import LayerRequest


class AdaptiveKParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(
        0.1, ge=0.0, le=1.0, description="drop the token's experts after its first when the second weight's share is below this"
    )
    renormalize: bool = Field(True, description="the kept expert gets the token's whole routing weight")


@register("adaptive-k")
class AdaptiveK(Modifier):
    """Run only a token's top-1 expert when its second routing weight, as a share of the token's
    routing mass, is below `threshold`; the wrapped policy then plans the executed experts
    (`adaptive-k(threshold=0.1)` is `lru+adaptive-k(...)`; `lfu+adaptive-k(...)` works too).

    AdapMoE (arXiv 2408.10284) observes that for many tokens the router's top-1 weight dominates and
    the second expert changes the output little, so it gates adaptively between one and two experts,
    cutting both compute and, under offloading, the experts that must be loaded. Here:

    - a token's top-1 is its highest-weight expert (ties: lower id); its second weight `w2` is
      compared as `w2 / sum(row) < threshold` (for routers that renormalise their top-k to 1, as
      Mixtral's, that is the weight itself); when it is below, every expert but the top-1 is dropped
      (for top-k > 2 all of them: the gate chooses between one expert and the full top-k);
    - with `renormalize` (the default, as AdapMoE does for Mixtral's renormalised top-2) the kept
      expert's weight becomes the token's whole routing mass `sum(row)`, i.e. 1 for Mixtral; without
      it the kept weight stays as routed;
    - `dropped_mass` is the routing weight of the dropped slots before renormalisation;
    - the plan carries the executed assignment (`topk` with -1 in dropped slots, `weights` with 0
      there), and the wrapped policy sees a request holding only the executed experts with their
      executed weights, so the access order (recency) follows the executed weights.

    `threshold=0` never drops anything: the wrapped policy's own plans. Needs nothing from the
    trace beyond the routing. Lossy. The wrapped policy must not change the routing itself, and it
    sees rows shorter than top-k (as lists, not a 2-D array).
    """

    Params = AdaptiveKParams
    lossless = False

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.tokens_dropped = 0  # token rows that ran their top-1 alone

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        p: AdaptiveKParams = self.params  # type: ignore[assignment]
        topk, weights = req.topk, req.weights
        if topk.shape[1] < 2 or p.threshold <= 0.0:
            return self._base_plan(req, cache)
        ids_rows: list[list[int]] = []
        w_rows: list[list[float]] = []
        ex_topk: np.ndarray | None = None
        ex_w: np.ndarray | None = None
        dropped = 0.0
        for i, (ids, ws) in enumerate(zip(topk.tolist(), weights.tolist(), strict=True)):
            total = sum(ws)
            order = sorted(range(len(ids)), key=lambda j: (-ws[j], ids[j]))
            first, second = order[0], order[1]
            if total > 0.0 and ws[second] / total < p.threshold:
                if ex_topk is None:
                    ex_topk, ex_w = topk.copy(), weights.copy()
                assert ex_w is not None
                for j in order[1:]:
                    dropped += ws[j]
                    ex_topk[i, j] = -1
                    ex_w[i, j] = 0.0
                kept = total if p.renormalize else ws[first]
                ex_w[i, first] = kept
                ids_rows.append([ids[first]])
                w_rows.append([kept])
                self.tokens_dropped += 1
            else:
                ids_rows.append(ids)
                w_rows.append(ws)
        if ex_topk is None:
            return self._base_plan(req, cache)
        executed = LayerRequest(req.step, req.phase, req.layer, ids_rows, w_rows, req.probs, req.lookahead, req.importance)
        plan = self._base_plan(executed, cache)
        plan.topk, plan.weights = ex_topk, ex_w
        plan.dropped_mass += dropped
        return plan

    def _base_plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        plan = self.base.plan(req, cache)
        if plan.topk is not None:
            raise PolicySpecError(f"adaptive-k cannot wrap {self.base.spec!r}: that policy changes the routing itself")
        return plan
