"""Belady's MIN: the offline optimum for demand replacement (an oracle, given the future)."""

from __future__ import annotations

from collections import deque

from policies.base import DemandPolicy, Future, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest

_NEVER = float("inf")


@register("belady")
class Belady(DemandPolicy):
    """Evict the expert whose next use lies farthest in the future (never used again: first).

    Needs the future accesses, which the simulator takes from the trace it replays; the runtime
    accepts it only when it repeats the very run that trace records. Ties go to the least recent.
    """

    needs_future = True

    def reset(self, model, cache, costs, future: Future | None = None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        assert future is not None
        self.calls = future.calls
        self.next_use: dict[Key, deque[int]] = {}
        for i, call in enumerate(future.calls):
            for k in call:
                self.next_use.setdefault(k, deque()).append(i)
        self.t = 0

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        t = self.t
        need = req.keys_in_access_order()
        if t >= len(self.calls) or list(self.calls[t]) != need:
            raise PolicySpecError(
                f"belady: the future it was given does not match layer call {t} (step {req.step}, layer {req.layer}); "
                "an oracle must replay the trace it was built from"
            )
        for k in need:
            self.next_use[k].popleft()
        plan = super().plan(req, cache)
        self.t = t + 1
        return plan

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        nxt = self.next_use
        best: Key | None = None
        best_t = -1.0
        for k in cache.least_recent(part):
            if k in exclude:
                continue
            q = nxt.get(k)
            when = q[0] if q else _NEVER
            if when > best_t:
                best, best_t = k, when
                if when == _NEVER:
                    break
        return best
