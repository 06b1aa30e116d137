"""Least recently used (mixtral-offloading keeps one such cache per layer)."""

from __future__ import annotations

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.request import Key


@register("lru")
class LRU(DemandPolicy):
    """Evict the expert used longest ago; recency inside a call follows the access order."""

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        for k in cache.least_recent(part):
            if k not in exclude:
                return k
        return None
