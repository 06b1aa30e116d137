"""What a policy decides for one layer call, and how an engine applies it to its cache and counters.

`apply_plan` is shared by the simulator and the runtime, so hit, miss and byte counts are the same by
construction; only time differs between the engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.cache import ExpertCache, PlanError
from policies.request import Key, LayerRequest

if TYPE_CHECKING:
    from policies.base import Policy

__all__ = ["RULES", "Counters", "LayerPlan", "Load", "PlanError", "apply_plan", "preload"]

RULES: dict[str, str] = {
    "load-twice": "a plan loads (or prefetches) an expert twice",
    "load-resident": "a plan loads an expert that is already resident (a new variant goes in its own slot: victim = key)",
    "run-unloaded": "a plan runs an expert on the GPU that is neither resident nor loaded by it",
    "load-unused": "an urgent load is for an expert the call does not run on the GPU (prefetch it instead)",
    "evict-absent": "a plan evicts an expert that is not resident (never loaded, or evicted already)",
    "evict-other-partition": "a plan evicts an expert of another partition to make room (per_layer caches)",
    "no-free-slot": "a plan loads into a full partition without evicting anything",
    "order": "`order` is not the experts of `execute`, each once",
    "reuse-before-run": "a load reuses the slot of an expert the call runs after the expert loaded into it (the copy "
                        "would wait for a compute that waits for the copy)",
    "unknown-variant": "a load's variant is not one the engine has bytes for (the policy's `variants`)",
    "invalid-plan": "a rule of the policy's own (a PlanError raised by the policy)",
}
"""The rules `apply_plan` checks; a `PlanError` names the one a plan breaks."""


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


def apply_plan(
    cache: ExpertCache,
    req: LayerRequest,
    plan: LayerPlan,
    counters: Counters,
    variant_bytes: dict[str, int],
    policy: Policy | None = None,
) -> None:
    """Check the plan against the cache, apply its loads and prefetches, touch the executed experts in
    access order, and count: a GPU expert is a hit if resident, an in-flight hit if its copy is still
    running, a miss if the plan loads it now.

    Every change is told to `policy` (each part of a composite that overrides a hook), in the order it
    is applied: for each load, then each prefetch, `on_evict(victim)` and `on_admit(key, variant,
    prefetch)`; then `on_access(key, hit)` for each expert run on the GPU, in access order. A plan that
    breaks a rule (`RULES`) raises `PlanError` naming the policy, the call and the rule; the run stops
    there (the cache is not rolled back)."""
    try:
        _apply(cache, req, plan, counters, variant_bytes, policy.listeners() if policy is not None else ())
    except PlanError as exc:
        raise exc.named(policy.spec if policy is not None else None, f"layer {req.layer} step {req.step}") from None


def _apply(
    cache: ExpertCache, req: LayerRequest, plan: LayerPlan, counters: Counters, variant_bytes: dict[str, int],
    listeners: tuple[Policy, ...],
) -> None:
    resident, inflight = cache.resident, cache.inflight
    loads = plan.loads
    execute = plan.execute
    hits = inflight_hits = 0
    loading: set[Key] = set()
    if loads:
        loading = {ld.key for ld in loads}
        if len(loading) != len(loads):
            raise PlanError("load-twice", "plan loads an expert twice")
        for key in execute:
            if key in loading:
                if key in resident and not any(ld.key == key and ld.victim == key for ld in loads):
                    raise PlanError("load-resident", f"plan loads {key}, which is already resident")
            elif key in inflight:
                inflight_hits += 1
            elif key in resident:
                hits += 1
            else:
                raise PlanError("run-unloaded", f"plan runs {key} on the GPU without loading it")
    else:
        for key in execute:
            if key in inflight:
                inflight_hits += 1
            elif key in resident:
                hits += 1
            else:
                raise PlanError("run-unloaded", f"plan runs {key} on the GPU without loading it")
    accesses = len(execute)
    misses = accesses - hits - inflight_hits
    if misses != len(loads):
        raise PlanError("load-unused", "an urgent load is for an expert this call does not run on the GPU")
    order = plan.order
    if order is not execute and (len(order) != accesses or set(order) != set(execute)):
        raise PlanError("order", f"order {order} is not the experts of execute {execute}, each once")
    for ld in loads:
        victim = ld.victim
        if victim is not None and victim != ld.key and victim in execute and order.index(victim) > order.index(ld.key):
            raise PlanError("reuse-before-run", f"plan loads {ld.key} into the slot of {victim}, which runs after it")
        nbytes = variant_bytes.get(ld.variant)
        if nbytes is None:
            raise PlanError("unknown-variant", f"plan loads {ld.key} as {ld.variant!r}; known: {', '.join(variant_bytes)}")
        if cache.apply_load(ld.key, victim, ld.variant):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += nbytes
        for p in listeners:
            if victim is not None:
                p.on_evict(victim)
            p.on_admit(ld.key, ld.variant, False)
    for ld in plan.prefetch:
        if ld.key in loading:
            raise PlanError("load-twice", f"plan loads {ld.key} and prefetches it too")
        nbytes = variant_bytes.get(ld.variant)
        if nbytes is None:
            raise PlanError("unknown-variant", f"plan prefetches {ld.key} as {ld.variant!r}; known: {', '.join(variant_bytes)}")
        if cache.apply_load(ld.key, ld.victim, ld.variant, prefetch=True):
            counters.wasted_prefetches += 1
        counters.bytes_h2d += nbytes
        for p in listeners:
            if ld.victim is not None:
                p.on_evict(ld.victim)
            p.on_admit(ld.key, ld.variant, True)
    cache.touch(execute)
    if plan.cpu:
        cache.touch(plan.cpu)
    for p in listeners:
        for key in execute:
            p.on_access(key, key not in loading)
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


def preload(cache: ExpertCache, key: Key, policy: Policy | None = None, variant: str = "full") -> None:
    """Put `key` in a free slot before a run (a warm start), resident and complete, and tell the policy
    (`on_admit`), as `apply_plan` would: a warm cache the policy does not know of would drift from it."""
    try:
        cache.apply_load(key, None, variant)
    except PlanError as exc:
        raise exc.named(policy.spec if policy is not None else None, "preload") from None
    cache.complete(key)
    for p in policy.listeners() if policy is not None else ():
        p.on_admit(key, variant, False)
