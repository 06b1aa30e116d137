"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023), per partition.

The worked example of docs/writing-a-policy.md: a policy with queues of its own, kept in step with the
cache by the engines' hooks (`on_admit`, `on_evict`, `on_access`), so it never drifts from it, not even
when `make_room`'s forced streaming path evicts an expert the same call loaded.
"""

from __future__ import annotations

from collections import OrderedDict

from pydantic import BaseModel, ConfigDict, Field

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.costs import CostModel
from policies.request import Key
from traces.schema import ModelSpec


class S3FIFOParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    small: float = Field(0.1, gt=0.0, lt=1.0, description="share of each partition's slots for the small FIFO S")
    max_freq: int = Field(3, ge=1, le=15, description="cap of the per-expert access counter (2 bits in the paper)")


class _Queues:
    """One partition's queues: S (new experts), M (experts used again), G (ghosts of experts evicted
    from S unused), each oldest first; `freq` counts hits since admission or the last reinsertion."""

    def __init__(self, capacity: int, small: float):
        self.small_target = max(1, round(small * capacity))
        self.ghost_size = max(1, capacity - self.small_target)  # G remembers as many experts as M holds
        self.s: OrderedDict[Key, None] = OrderedDict()
        self.m: OrderedDict[Key, None] = OrderedDict()
        self.g: OrderedDict[Key, None] = OrderedDict()
        self.freq: dict[Key, int] = {}


@register("s3fifo")
class S3FIFO(DemandPolicy):
    """S3-FIFO: a small FIFO filters experts used once, a main FIFO with reinsertion keeps the rest.

    A new expert enters S (or M, if G remembers it). Evicting from S (while S holds its share of the
    slots): the oldest expert moves to M if it was hit since it came in, else it is evicted and
    remembered in G. Evicting from M: the oldest expert hit since it came in (or was last reinserted)
    is reinserted with one hit less, the first one not hit is evicted. Hits count up to `max_freq`.
    """

    Params = S3FIFOParams

    def reset(self, model: ModelSpec, cache: ExpertCache, costs: CostModel | None, future: object = None) -> None:
        super().reset(model, cache, costs, future)  # type: ignore[arg-type]
        small = self.params.small  # type: ignore[attr-defined]
        self.cache = cache
        self.q = [_Queues(cap, small) for cap in cache.part_capacity]

    # -- the engines tell the policy every change --------------------------------------------------
    def on_admit(self, key: Key, variant: str, prefetch: bool) -> None:
        q = self.q[self.cache.part(key)]
        if key in q.g:
            del q.g[key]
            q.m[key] = None
        else:
            q.s[key] = None
        q.freq[key] = 0

    def on_evict(self, key: Key) -> None:
        q = self.q[self.cache.part(key)]
        q.freq.pop(key, None)
        if key in q.s:
            del q.s[key]
            q.g[key] = None
            while len(q.g) > q.ghost_size:
                q.g.popitem(last=False)
        else:
            q.m.pop(key, None)

    def on_access(self, key: Key, hit: bool) -> None:
        if hit:
            q = self.q[self.cache.part(key)]
            f = q.freq.get(key)
            if f is not None and f < self.params.max_freq:  # type: ignore[attr-defined]
                q.freq[key] = f + 1

    # -- the eviction choice ------------------------------------------------------------------------
    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        """Promotions from S to M and reinsertions in M happen here, as S3-FIFO does them on the way
        to a victim (they move no expert in or out of the cache); the eviction itself is `on_evict`."""
        q = self.q[part]
        while True:
            if len(q.s) >= q.small_target or not any(k not in exclude for k in q.m):
                k = next((k for k in q.s if k not in exclude), None)
                if k is None and not q.m:
                    return None
                if k is not None:
                    if q.freq.get(k, 0) == 0:
                        return k
                    del q.s[k]  # hit in S: on to M, its count spent
                    q.m[k] = None
                    q.freq[k] = 0
                    continue
            k = next((k for k in q.m if k not in exclude), None)
            if k is None:
                return None
            f = q.freq.get(k, 0)
            if f == 0:
                return k
            q.freq[k] = f - 1  # reinsertion: to the head of M, one hit less
            q.m.move_to_end(k)
