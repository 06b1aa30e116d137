"""Static placement: the most frequently used experts pinned, the rest streamed through a few slots."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from policies.base import DemandPolicy, Future, PolicySpecError, register
from policies.cache import ExpertCache
from policies.request import Key


class StaticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    trace: str | None = Field(None, description="profile trace for the frequencies; default: the replayed trace (oracle)")
    scratch: int | None = Field(None, ge=1, description="unpinned slots per partition; default top_k")


@register("static")
class Static(DemandPolicy):
    """Pin the most used experts of each partition, counted on a profiling trace (or, as an oracle,
    on the replayed trace itself); other experts share `scratch` slots under LRU.

    Pinned experts load on first use like any other (every policy starts cold). A pinned expert is
    evicted (least recent first) only when a call needs more unpinned experts than there are scratch
    slots.
    """

    Params = StaticParams

    def wants_future(self) -> bool:
        return self.params.trace is None  # type: ignore[attr-defined]

    def reset(self, model, cache, costs, future: Future | None = None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        p: StaticParams = self.params  # type: ignore[assignment]
        if p.trace is not None:
            counts = _count_trace(p.trace, model)
        elif future is not None:
            counts = future.counts()
        else:
            raise PolicySpecError("static: give trace=PATH for the frequencies, or replay a trace")
        scratch = p.scratch if p.scratch is not None else model.top_k
        by_part: dict[int, list[Key]] = {}
        for k in sorted(counts, key=lambda k: (-counts[k], k)):
            by_part.setdefault(cache.part(k), []).append(k)
        self.pinned: set[Key] = set()
        for part, keys in by_part.items():
            room = max(0, cache.part_capacity[part] - scratch)
            self.pinned.update(keys[:room])

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        pinned = self.pinned
        fallback: Key | None = None
        for k in cache.least_recent(part):
            if k not in exclude:
                if k not in pinned:
                    return k
                if fallback is None:
                    fallback = k
        return fallback


def _count_trace(path: str, model) -> dict[Key, int]:  # type: ignore[no-untyped-def]
    from traces.io import read_header

    other = read_header(path).model
    if (other.num_experts, other.num_moe_layers) != (model.num_experts, model.num_moe_layers):
        raise PolicySpecError(
            f"static: profile trace {path} is for {other.name} ({other.num_moe_layers} layers x {other.num_experts} experts), "
            f"not {model.name}"
        )
    return Future.from_trace(path).counts()
