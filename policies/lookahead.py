"""Look-ahead prefetch: while layer l computes, copy in the experts later layers are predicted to need.

Speculative expert loading from mixtral-offloading (Eliseev & Mazur, arXiv 2312.17238), and the
prefetchers of AdapMoE, ProMoE and DAOP: apply the routers of the next layers to the current hidden
state (the trace's `lookahead` field) and start copying what they pick, so the copy overlaps the
compute in between.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.base import Modifier, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest


class LookaheadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    depth: int = Field(1, ge=1, le=16, description="later MoE layers predicted at each call: l+1 .. l+depth")
    budget: int = Field(2, ge=0, le=1024, description="prefetches issued per layer call at most (0: none)")
    predictor: Literal["auto", "lookahead", "history"] = Field(
        "auto", description="auto: the request's lookahead where it has one, else history; or force one"
    )


def rank_predicted(rows: np.ndarray) -> list[int]:
    """The experts a look-ahead predicts for one layer, most wanted first: by the number of token rows
    that pick it, then by its best rank in a row (the router's own order), then lower id."""
    count: dict[int, int] = {}
    best: dict[int, int] = {}
    for row in rows.tolist():
        for j, e in enumerate(row):
            count[e] = count.get(e, 0) + 1
            if j < best.get(e, 1 << 30):
                best[e] = j
    return sorted(count, key=lambda e: (-count[e], best[e], e))


@register("lookahead")
class Lookahead(Modifier):
    """Prefetch the experts predicted for layers l+1..l+depth that are not resident, at most `budget`
    per layer call; victims are the wrapped policy's (`lru+lookahead(depth=1, budget=2)`).

    Papers: mixtral-offloading (arXiv 2312.17238, speculative expert loading), AdapMoE, ProMoE, DAOP.
    The predictor is the request's `lookahead` (the later layers' routers applied to this layer's
    input); where a request has none (a trace recorded without it, such as the imported Mixtral
    traces), the `history` predictor stands in: the experts the target layer used at its previous
    call, i.e. for the previous token. `predictions` counts, per predictor, the target layers it
    predicted, and `notes()` says which one ran. Prefetches never evict an expert the call uses nor
    one predicted for the look-ahead window (`make_room(after=plan.loads, force=False)`), and they
    queue behind the call's urgent loads. Lossless.
    """

    Params = LookaheadParams
    uses = frozenset({"lookahead"})

    def __init__(self, params: BaseModel | None = None, **kwargs: object):
        super().__init__(params, **kwargs)  # type: ignore[arg-type]
        p: LookaheadParams = self.params  # type: ignore[assignment]
        if p.predictor == "history":  # the runtime need not compute the look-ahead signal
            self.uses = frozenset()
            self.lookahead_depth = 0
        else:
            self.lookahead_depth = p.depth

    def required_fields(self) -> set[str]:
        strict = {"lookahead"} if self.params.predictor == "lookahead" else set()  # type: ignore[attr-defined]
        return strict | self.base.required_fields()

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.last: dict[int, list[int]] = {}  # MoE layer -> experts of its previous call, in access order
        self.predictions: dict[str, int] = {"lookahead": 0, "history": 0}

    @property
    def predictor_used(self) -> str:
        """`lookahead`, `history`, `lookahead+history` (both ran, e.g. a trace with a shallower
        look-ahead than `depth`) or `none` (nothing predicted yet)."""
        used = [k for k in ("lookahead", "history") if self.predictions[k]]
        return "+".join(used) or "none"

    def notes(self) -> list[str]:
        n = self.predictions
        mine: list[str] = []
        if n["history"] and not n["lookahead"]:
            mine.append(f"lookahead: predicted from history for all {n['history']} target layers (the requests carry no lookahead)")
        elif n["history"]:
            mine.append(f"lookahead: predicted {n['lookahead']} target layers from the lookahead field and {n['history']} from history")
        return mine + self.base.notes()

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        plan = self.base.plan(req, cache)
        p: LookaheadParams = self.params  # type: ignore[assignment]
        layer = req.layer
        look = None if p.predictor == "history" else req.lookahead
        if look is None and p.predictor == "lookahead":
            raise PolicySpecError(f"lookahead(predictor=lookahead): layer call {layer} of step {req.step} has no lookahead")
        last = self.last
        resident = cache.resident
        planned = {ld.key for ld in plan.loads} | {ld.key for ld in plan.prefetch}
        predicted: set[Key] = set()
        targets: list[Key] = []
        for x in range(layer + 1, min(layer + p.depth, self.model.num_moe_layers - 1) + 1):
            if look is not None and x in look:
                experts = rank_predicted(look[x])
                self.predictions["lookahead"] += 1
            elif p.predictor != "lookahead" and x in last:
                experts = last[x]
                self.predictions["history"] += 1
            else:
                continue
            for e in experts:
                key = (x, e)
                predicted.add(key)
                if key not in resident and key not in planned:
                    planned.add(key)
                    targets.append(key)
        last[layer] = req.experts_in_access_order()
        if targets and p.budget:
            protect = set(plan.execute) | set(plan.cpu) | predicted
            pre = self.make_room(cache, targets[: p.budget], protect, force=False, after=[*plan.loads, *plan.prefetch])
            if pre:
                plan.prefetch = [*plan.prefetch, *pre]
        return plan
