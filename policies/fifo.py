"""First in, first out."""

from __future__ import annotations

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.request import Key


@register("fifo")
class FIFO(DemandPolicy):
    """Evict the expert loaded earliest, however often it was used since."""

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        for k in cache.oldest(part):
            if k not in exclude:
                return k
        return None
