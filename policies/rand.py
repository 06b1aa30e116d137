"""Random replacement (the baseline the mixtral-offloading fork also reports)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.request import Key


class RandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 0


@register("random")
class Random(DemandPolicy):
    """Evict a uniformly chosen expert, from a generator seeded by `seed` (same choices in both engines)."""

    Params = RandomParams

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.rng = np.random.default_rng(self.params.seed)  # type: ignore[attr-defined]

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        candidates = [k for k in cache.oldest(part) if k not in exclude]
        if not candidates:
            return None
        return candidates[int(self.rng.integers(len(candidates)))]
