"""What a policy decides for one layer call, and how an engine applies it to its cache and counters.

`apply_plan` is shared by the simulator and the runtime, so hit, miss and byte counts are the same by
construction; only time differs between the engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.cache import CacheError, ExpertCache
from policies.request import Key, LayerRequest


class PlanError(CacheError):
    """A policy returned a plan that cannot be executed (a policy bug, named as such)."""


@dataclass(slots=True)
class Load:
    """Copy `key` into a slot, in place of `victim` (None: a free slot).

    The copy may start only when the victim's slot is released: after the victim's own load and after
    its compute in the current call, if the call uses it.
    """

    key: Key
    victim: Key | None = None
    variant: str = "full"


@dataclass(slots=True)
class LayerPlan:
    execute: list[Key]  # distinct experts run on the GPU, in access order (the touch order)
    order: list[Key]  # the same experts in GPU execution order
    loads: list[Load] = field(default_factory=list)  # urgent: this call waits for them
    prefetch: list[Load] = field(default_factory=list)  # for later layers; nobody waits now
    cpu: list[Key] = field(default_factory=list)  # experts run on the CPU instead (Fiddler-style)
    topk: np.ndarray | None = None  # executed assignment if the policy changed it; -1 marks a dropped slot
    weights: np.ndarray | None = None
    dropped_mass: float = 0.0  # routing weight whose expert was not run at all
    substituted_mass: float = 0.0  # routing weight served by another expert than the router chose

    @property
    def evictions(self) -> list[Key]:
        return [ld.victim for ld in (*self.loads, *self.prefetch) if ld.victim is not None]

    def tokens_per_expert(self, req: LayerRequest) -> dict[int, int]:
        if self.topk is None:
            return req.tokens_per_expert()
        counts: dict[int, int] = {}
        for e in self.topk.ravel().tolist():
            if e >= 0:
                counts[e] = counts.get(e, 0) + 1
        return counts


@dataclass(slots=True)
class Counters:
    """The count metrics of DESIGN section 5 (times are the engines' business)."""

    layer_calls: int = 0
    accesses: int = 0
    hits: int = 0
    inflight_hits: int = 0
    misses: int = 0
    prefetches: int = 0
    wasted_prefetches: int = 0
    bytes_h2d: int = 0
    cpu_experts: int = 0
    routed_mass: float = 0.0
    dropped_mass: float = 0.0
    substituted_mass: float = 0.0

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.inflight_hits) / self.accesses if self.accesses else 0.0


HIT, INFLIGHT_HIT, MISS = 0, 1, 2


def apply_plan(
    cache: ExpertCache, req: LayerRequest, plan: LayerPlan, counters: Counters, variant_bytes: dict[str, int]
) -> list[int]:
    """Classify the plan's GPU experts (HIT, INFLIGHT_HIT or MISS, in `plan.execute` order), apply its
    loads and prefetches to the cache, touch the executed experts in access order, and count."""
    resident, inflight = cache.resident, cache.inflight
    loading = {ld.key for ld in plan.loads}
    kinds: list[int] = []
    for key in plan.execute:
        if key in loading:
            if key in resident:
                raise PlanError(f"layer {req.layer} step {req.step}: plan loads {key}, which is already resident")
            kinds.append(MISS)
        elif key in inflight:
            kinds.append(INFLIGHT_HIT)
        elif key in resident:
            kinds.append(HIT)
        else:
            raise PlanError(f"layer {req.layer} step {req.step}: plan runs {key} on the GPU without loading it")
    if len(loading) != len(plan.loads) or kinds.count(MISS) != len(plan.loads):
        raise PlanError(
            f"layer {req.layer} step {req.step}: urgent loads must be distinct experts that this call runs on the GPU"
        )
    for ld in plan.loads:
        if cache.apply_load(ld.key, ld.victim, ld.variant):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += variant_bytes[ld.variant]
    for ld in plan.prefetch:
        if cache.apply_load(ld.key, ld.victim, ld.variant, prefetch=True):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += variant_bytes[ld.variant]
    for key in plan.execute:
        cache.touch(key)
    for key in plan.cpu:
        cache.touch(key)
    counters.layer_calls += 1
    counters.accesses += len(kinds)
    counters.hits += kinds.count(HIT)
    counters.inflight_hits += kinds.count(INFLIGHT_HIT)
    counters.misses += len(plan.loads)
    counters.prefetches += len(plan.prefetch)
    counters.cpu_experts += len(plan.cpu)
    counters.routed_mass += req.total_mass
    counters.dropped_mass += plan.dropped_mass
    counters.substituted_mass += plan.substituted_mass
    return kinds
