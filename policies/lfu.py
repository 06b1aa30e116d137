"""Least frequently used, with optional exponential decay of old uses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest

_RESCALE_AT = 1e200


class LFUParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    decay: float = Field(1.0, gt=0.0, le=1.0, description="per forward step; 1.0 counts all uses equally")


@register("lfu")
class LFU(DemandPolicy):
    """Evict the expert with the fewest (decayed) uses since the start; ties go to the least recent.

    Counts include uses while not resident ("perfect LFU"), as MoE activation statistics do. With
    decay d each use counts d**age, age in forward steps; scores are kept scaled by d**-step so a
    step costs nothing, and rescaled before they overflow.
    """

    Params = LFUParams

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.score: dict[Key, float] = {}
        self._step: int | None = None
        self._unit = 1.0

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        decay = self.params.decay  # type: ignore[attr-defined]
        if decay < 1.0 and req.step != self._step:
            if self._step is not None:
                self._unit /= decay ** (req.step - self._step)
            self._step = req.step
            if self._unit > _RESCALE_AT:
                self.score = {k: v / self._unit for k, v in self.score.items()}
                self._unit = 1.0
        plan = super().plan(req, cache)  # victims are chosen on the counts before this call
        unit, score = self._unit, self.score
        for k in plan.execute:
            score[k] = score.get(k, 0.0) + unit
        return plan

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return cache.lowest(part, exclude, self.score)
