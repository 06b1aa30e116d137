"""The `simulator` case of `python -m policies.check`: the SimPy engine counts what the counting loop
counts, for the same policy on the same trace (the split of hits into resident and in-flight ones is
timing, so it is compared as their sum)."""

from __future__ import annotations

from collections.abc import Callable

from lab.cache import CacheConfig
from lab.hardware import HostProfile, load_profile
from policies import Future, Policy
from policies.check import ROOMY, CaseFailed, _cache, count, header, model_spec, records
from sim.assembly import assemble

COMPARED = ("layer_calls", "accesses", "misses", "prefetches", "bytes_h2d", "cpu_experts", "wasted_prefetches")


def check(fresh: Callable[[], Policy]) -> str:
    model = model_spec()
    recs = records(seed=3)
    want, _ = count(fresh(), _cache(model, "global", ROOMY["global"]), recs, model)
    card = load_profile("rtx4090")
    # the compute stream driven directly, and through the host timeline (`sim.host`: a profile with host costs)
    for name, profile in (("", card), (" (host timeline)", card.model_copy(update={"host": HostProfile(step_s=2e-5, copy_s=1e-6)}))):
        run = assemble(header(model), fresh(), CacheConfig(experts=ROOMY["global"]), profile,
                       future=lambda: Future.from_records(recs))
        got = run.simulation().run(recs).counters
        diffs = [f"{k} {getattr(got, k)} (counting loop: {getattr(want, k)})" for k in COMPARED if getattr(got, k) != getattr(want, k)]
        if got.hits + got.inflight_hits != want.hits + want.inflight_hits:
            diffs.append(f"hits + inflight_hits {got.hits + got.inflight_hits} (counting loop: {want.hits + want.inflight_hits})")
        if diffs:
            raise CaseFailed(f"the simulator{name} counts differently: " + ", ".join(diffs))
    return f"{got.misses} misses, {got.prefetches} prefetches in both, with and without the host timeline"
