"""What a policy decides for one layer call, and how an engine applies it to its cache and counters.

`apply_plan` is shared by the simulator and the runtime, so hit, miss and byte counts are the same by
construction; only time differs between the engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.cache import CacheError, ExpertCache
from policies.request import Key, LayerRequest


class PlanError(CacheError):
    """A policy returned a plan that cannot be executed (a policy bug, named as such)."""


@dataclass(slots=True)
class Load:
    """Copy `key` into a slot, in place of `victim` (None: a free slot; `key` itself: replace the
    resident copy in its own slot by another variant, e.g. a `low` copy upgraded to `full`).

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
    loads: Sequence[Load] = ()  # urgent: this call waits for them
    prefetch: Sequence[Load] = ()  # for later layers; nobody waits now
    cpu: Sequence[Key] = ()  # experts run on the CPU instead (Fiddler-style)
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

    def metrics(self, steps: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
        """The metrics both engines report the same way, from these counts and the steps' (phase,
        start, end) in seconds. TTFT: every maximal run of consecutive prefill steps (a prompt's
        chunks) ends with a first token, so it is the mean duration of those runs; TPOT: the mean
        decode step."""
        runs: list[float] = []
        run_start: float | None = None
        prev_end = 0.0
        for phase, start, end in steps:
            if phase == "prefill" and run_start is None:
                run_start = start
            if phase == "decode" and run_start is not None:
                runs.append(prev_end - run_start)
                run_start = None
            prev_end = end
        if run_start is not None:
            runs.append(prev_end - run_start)
        decode = [end - start for phase, start, end in steps if phase == "decode"]
        mass = self.routed_mass or 1.0
        return {
            "layer_calls": self.layer_calls,
            "steps": len(steps),
            "prefill_steps": len(steps) - len(decode),
            "decode_steps": len(decode),
            "accesses": self.accesses,
            "hits": self.hits,
            "inflight_hits": self.inflight_hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "prefetches": self.prefetches,
            "wasted_prefetches": self.wasted_prefetches,
            "cpu_experts": self.cpu_experts,
            "bytes_h2d": self.bytes_h2d,
            "ttft_s": sum(runs) / len(runs) if runs else None,
            "tpot_s": sum(decode) / len(decode) if decode else None,
            "dropped_mass": self.dropped_mass / mass,
            "substituted_mass": self.substituted_mass / mass,
        }


def apply_plan(cache: ExpertCache, req: LayerRequest, plan: LayerPlan, counters: Counters, variant_bytes: dict[str, int]) -> None:
    """Check the plan against the cache, apply its loads and prefetches, touch the executed experts in
    access order, and count: a GPU expert is a hit if resident, an in-flight hit if its copy is still
    running, a miss if the plan loads it now."""
    resident, inflight = cache.resident, cache.inflight
    loads = plan.loads
    hits = inflight_hits = 0
    if loads:
        loading = {ld.key for ld in loads}
        if len(loading) != len(loads):
            raise PlanError(f"layer {req.layer} step {req.step}: plan loads an expert twice")
        for key in plan.execute:
            if key in loading:
                if key in resident and not any(ld.key == key and ld.victim == key for ld in loads):
                    raise PlanError(f"layer {req.layer} step {req.step}: plan loads {key}, which is already resident")
            elif key in inflight:
                inflight_hits += 1
            elif key in resident:
                hits += 1
            else:
                raise PlanError(f"layer {req.layer} step {req.step}: plan runs {key} on the GPU without loading it")
    else:
        for key in plan.execute:
            if key in inflight:
                inflight_hits += 1
            elif key in resident:
                hits += 1
            else:
                raise PlanError(f"layer {req.layer} step {req.step}: plan runs {key} on the GPU without loading it")
    accesses = len(plan.execute)
    misses = accesses - hits - inflight_hits
    if misses != len(loads):
        raise PlanError(f"layer {req.layer} step {req.step}: an urgent load is for an expert this call does not run on the GPU")
    for ld in loads:
        if cache.apply_load(ld.key, ld.victim, ld.variant):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += variant_bytes[ld.variant]
    for ld in plan.prefetch:
        if cache.apply_load(ld.key, ld.victim, ld.variant, prefetch=True):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += variant_bytes[ld.variant]
    cache.touch(plan.execute)
    if plan.cpu:
        cache.touch(plan.cpu)
    counters.layer_calls += 1
    counters.accesses += accesses
    counters.hits += hits
    counters.inflight_hits += inflight_hits
    counters.misses += misses
    counters.prefetches += len(plan.prefetch)
    if plan.cpu:
        counters.cpu_experts += len(plan.cpu)
    counters.routed_mass += req.total_mass
    counters.dropped_mass += plan.dropped_mass
    counters.substituted_mass += plan.substituted_mass
