"""One way to assemble a run: trace header + policy + cache size + hardware profile -> the engine.

`sim.replay`, the sweep's workers, `sim.curves` (its small sizes) and `sim.report` (through replay)
all build their runs here, so they check the same things in the same order and cannot drift apart:

1. the policy (a spec string, a Policy subclass or an instance: `policies.as_policy`);
2. the trace carries every field the policy requires (`Policy.required_fields`), else `ReplayError`;
3. the cache (`CacheConfig.build`: sizes no cache can hold are refused);
4. the cost model from the profile, with the bytes of every variant the policy moves;
5. the future accesses, only for an oracle (`Policy.wants_future`), and `Policy.reset`.

`check_policy` is steps 1-2 alone: what a sweep checks up front for every (trace, policy) pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lab.cache import GIB, CacheConfig
from lab.hardware import HardwareProfile
from policies import CostModel, ExpertCache, Future, Policy, PolicyLike, as_policy
from policies.costs import variant_bytes
from traces.schema import Header, ModelSpec

if TYPE_CHECKING:
    from sim.engine import Simulation, Timeline


class ReplayError(ValueError):
    """A run that cannot be assembled from these inputs (one line, naming the trace)."""


@dataclass
class Run:
    """A policy reset on an empty cache of one model, with the costs of one profile (or none: counts only)."""

    model: ModelSpec
    policy: Policy
    cache: ExpertCache
    costs: CostModel | None
    profile: HardwareProfile | None
    notes: list[str] = field(default_factory=list)

    def simulation(self, timeline: Timeline | None = None) -> Simulation:
        """The SimPy model of this run (needs a profile)."""
        from sim.engine import Simulation

        if self.costs is None or self.profile is None:
            raise ValueError("a simulation needs a hardware profile")
        return Simulation(self.model, self.policy, self.cache, self.costs, copy_engines=self.profile.link.copy_engines,
                          timeline=timeline)


def check_policy(header: Header | None, policy: PolicyLike, source: str = "the trace") -> Policy:
    """The policy, refused with one line if the trace lacks a field it requires."""
    pol = as_policy(policy)
    if header is not None:
        missing = sorted(f for f in pol.required_fields() if not header.carries(f))
        if missing:
            raise ReplayError(
                f"{source}: policy {pol.spec!r} needs the trace field(s) {', '.join(missing)}, which this trace does not "
                "carry (record it with python -m runtime.record)"
            )
    return pol


def assemble(
    trace: Header | ModelSpec,
    policy: PolicyLike,
    cache: CacheConfig,
    profile: HardwareProfile | None,
    *,
    future: Future | Callable[[], Future] | None = None,
    source: str = "the trace",
) -> Run:
    """Build and reset the run (steps 1-5 above). `trace` is the trace's header (or only a model spec,
    where no trace fields are checked); `future` the future accesses, or a function that reads them,
    called only for an oracle; `source` names the trace in errors."""
    header = trace if isinstance(trace, Header) else None
    model = trace.model if isinstance(trace, Header) else trace
    pol = check_policy(header, policy, source)
    ca = cache.build(model)
    notes: list[str] = []
    costs = None
    if profile is not None:
        costs = profile.cost_model(model, variant_bytes(model, pol))  # a low-precision variant's bytes too
        budget = profile.expert_budget_bytes(model)
        cache_bytes = ca.capacity * model.expert_bytes
        if cache_bytes > budget:
            notes.append(
                f"the cache ({cache_bytes / GIB:.1f} GiB) exceeds what {profile.name} has left for experts "
                f"({max(budget, 0) / GIB:.1f} GiB after {model.dense_bytes / GIB:.1f} GiB dense weights and "
                f"{profile.gpu.reserve_gib:g} GiB reserve); timings assume it fits"
            )
    fut = None
    if pol.wants_future():
        fut = future() if callable(future) else future
    pol.reset(model, ca, costs, fut)
    return Run(model, pol, ca, costs, profile, notes)
