"""The SimPy model of an offloaded MoE forward pass (DESIGN section 5).

Hardware is modelled as SimPy processes and resources named for what they are:

- `gpu_stream`: the compute stream. One generator walks the trace layer by layer: the dense part of
  the layer, then the plan's GPU experts in execution order, each waiting for its own weights, so
  copies and computes pipeline inside a layer.
- `copies`: the copy engine(s) (`sim.copyengine.CopyEngine`), fed by a priority queue (urgent loads
  before prefetches, FIFO within each class, a started copy never pre-empted). A copy into a slot
  first waits for the slot's previous occupant to be released: its own copy done, and its compute
  done if the current call uses it; it waits off the queue, so the engines copy something else meanwhile.
- `cpu`: a resource for experts the plan runs on the host (Fiddler-style).
- `host` (`sim.host`), when the cost model has host costs (`CostModel.host`): the thread that plans
  each layer, submits its copies and launches its kernels, each at its own cost, on a timeline of
  its own; the compute stream then runs only what the host has launched, and the host waits where
  the runtime synchronises. Without host costs the compute stream is driven directly (below), as
  before the host timeline existed, to the bit.

The policy sees the cache at plan time (after the layer's dense part: the router decides then);
`policies.apply_plan` changes the cache and the counters, so hits + in-flight hits, misses and bytes
do not depend on timing and equal the runtime's. Only the split between `hits` and `inflight_hits`
(a prefetch still copying when it is used) is timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import simpy
from simpy.events import NORMAL as _NORMAL

from policies import Counters, ExpertCache, Future, Key, LayerRequest, Policy, apply_plan
from policies.costs import CostModel
from sim.context import with_keys
from sim.copyengine import PREFETCH, URGENT, CopyEngine, Transfer
from traces.schema import LayerRecord, ModelSpec, StepRecord

__all__ = ["PREFETCH", "URGENT", "Interval", "SimResult", "Simulation", "StepTime", "Timeline", "Transfer", "future_of",
           "request_from_record"]


def request_from_record(rec: LayerRecord | LayerRequest) -> LayerRequest:
    """The policy's view of one trace record; the rows become numpy arrays if a policy asks. A
    request is its own view (a columnar trace's calls, `sim.calls.requests`)."""
    if isinstance(rec, LayerRequest):
        return rec
    return LayerRequest(
        rec.step,
        rec.phase,
        rec.layer,
        rec.topk,
        rec.weights,
        rec.probs,
        None if rec.lookahead is None else {int(k): v for k, v in rec.lookahead.items()},
        rec.importance,
    )


def future_of(records: Iterable[LayerRecord | StepRecord]) -> Future:
    """Every layer call's keys in access order: what oracle policies are given at reset."""
    return Future.from_records(records)


def _memo(fn: Callable[[int], float]) -> Callable[[int], float]:
    """Costs by token count, computed once: the compute stream asks for the same few counts all the time."""
    table: dict[int, float] = {}

    def cost(n: int) -> float:
        v = table.get(n)
        if v is None:
            v = table[n] = fn(n)
        return v

    return cost


@dataclass(slots=True)
class Interval:
    lane: str
    start: float
    end: float
    label: str
    step: int


@dataclass
class Timeline:
    """Intervals of steps `first_step` .. `first_step + max_steps - 1`, for the Gantt chart; nothing
    else is kept (a cold cache makes the first steps all copies, so a user may look further on)."""

    max_steps: int = 4
    first_step: int = 0
    intervals: list[Interval] = field(default_factory=list)
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (step, start, end)

    def wants(self, step: int) -> bool:
        return self.first_step <= step < self.first_step + self.max_steps

    def add(self, lane: str, start: float, end: float, label: str, step: int) -> None:
        if end > start and self.first_step <= step < self.first_step + self.max_steps:
            self.intervals.append(Interval(lane, start, end, label, step))


@dataclass
class StepTime:
    step: int
    phase: str
    start: float
    end: float


@dataclass
class SimResult:
    counters: Counters
    steps: list[StepTime]
    makespan_s: float
    stall_s: float
    cpu_wait_s: float
    gpu_busy_s: float
    link_busy_s: float
    copy_engines: int
    host: dict[str, float] | None = None  # the host timeline's own metrics, when it was simulated

    def metrics(self) -> dict[str, Any]:
        m = self.counters.metrics([(s.phase, s.start, s.end) for s in self.steps])
        span = self.makespan_s
        m.update(
            {
                "stall_s": self.stall_s,
                "cpu_wait_s": self.cpu_wait_s,
                "total_s": span,
                "gpu_busy_frac": self.gpu_busy_s / span if span else 0.0,
                "link_busy_frac": self.link_busy_s / (self.copy_engines * span) if span else 0.0,
            }
        )
        if self.host is not None:
            m.update(self.host)
        return m


class Simulation:
    """One replay: a policy, a cache and a cost model, driven by a stream of trace records."""

    def __init__(
        self,
        model: ModelSpec,
        policy: Policy,
        cache: ExpertCache,
        costs: CostModel,
        copy_engines: int = 1,
        timeline: Timeline | None = None,
    ):
        self.model, self.policy, self.cache, self.costs = model, policy, cache, costs
        self.timeline = timeline
        self.env = simpy.Environment()
        self.counters = Counters()
        self.copies = CopyEngine(self.env, costs, cache, copy_engines, timeline.add if timeline is not None else None)
        self.cpu = simpy.Resource(self.env, capacity=1)
        self.copy_engines = copy_engines
        self.steps: list[StepTime] = []
        self.stall_s = 0.0  # the GPU waiting for copies
        self.cpu_wait_s = 0.0  # the GPU waiting for experts run on the CPU
        self.gpu_busy_s = 0.0
        self.nonmoe_layers = model.num_layers - model.num_moe_layers

    # -- the compute stream, driven directly (no host costs) ----------------------------------------
    def _cpu_experts(self, costs: list[float]) -> Iterator[simpy.Event]:
        with self.cpu.request() as req:
            yield req
            yield self.env.timeout(sum(costs))

    def _gpu_stream(self, records: Iterable[LayerRecord | StepRecord]) -> Iterator[simpy.Event]:
        """The compute stream. `t` is GPU work scheduled after `env.now` but not yet yielded: the
        stream runs ahead of the clock while nothing it does can be observed, and yields (lets the
        clock catch up) before the policy looks at a cache that copies in flight may change, and
        before it waits for a copy whose landing time is not yet known."""
        env, cache, policy, costs, counters = self.env, self.cache, self.policy, self.costs, self.counters
        tl = self.timeline
        copies = self.copies
        loading = copies.loading
        variant_bytes = costs.variant_bytes
        engines = self.copy_engines
        step = -1
        phase = "decode"
        step_start = 0.0
        t = 0.0
        no_release: dict[Key, simpy.Event] = {}
        dense_s = _memo(costs.dense_s)
        expert_s = _memo(costs.gpu_expert_s)
        step_s = _memo(costs.step)
        per_key = costs.dense_per_key_s
        one_row: dict[int, int] = {}
        d_one = expert_s(1)
        # Waiting without suspending: `advance(d)` does what `yield env.timeout(d)` does (every event
        # due before that timeout would fire is processed, in SimPy's own order: time, priority, id;
        # then the clock moves on), without a Timeout, a suspension and a resumption of this
        # generator: the copy engines' events are callbacks that need no other process. So the
        # stream suspends only while a CPU process runs (that process must be resumed by SimPy).
        queue, eids, run_one = env._queue, env._eid, env.step

        def advance(delay: float) -> None:
            at = env._now + delay
            me = next(eids)  # the id that timeout would have taken: later events keep theirs
            while queue:
                head = queue[0]
                if head[0] < at or (head[0] == at and (head[1] < _NORMAL or (head[1] == _NORMAL and head[2] < me))):
                    run_one()
                else:
                    break
            env._now = at

        def until(ev: simpy.Event) -> bool:
            """Process events until `ev` has been (what `yield ev` waits for); False if none are left."""
            while ev.callbacks is not None:
                if not queue:
                    return False
                run_one()
            return True

        stream: Iterable[tuple[LayerRecord, int]] | Iterable[LayerRecord | StepRecord | LayerRequest] = (
            with_keys(records) if per_key else records
        )
        keys = 0
        busy = self.gpu_busy_s  # accumulated here (the same additions in the same order), stored at the end
        for rec in stream:
            if per_key:
                rec, keys = rec  # type: ignore[misc]
            elif not isinstance(rec, (LayerRecord, LayerRequest)):
                continue
            if rec.step != step:
                if step >= 0:
                    self._end_step(step, phase, step_start, env._now + t)
                step, phase, step_start = rec.step, rec.phase, env._now + t
                d = step_s(rec.tokens)  # the step's own overhead (embeddings, LM head, sampling)
                t += d
                busy += d
                if self.nonmoe_layers:
                    d = self.nonmoe_layers * (dense_s(rec.tokens) + per_key * keys)
                    if tl is not None:
                        tl.add("gpu", env._now + t, env._now + t + d, "dense layers", step)
                    t += d
                    busy += d
            # the dense part (attention, router) first: the router's choice exists only after it
            d = dense_s(rec.tokens) + per_key * keys if keys else dense_s(rec.tokens)
            if tl is not None:
                tl.add("gpu", env._now + t, env._now + t + d, f"dense L{rec.layer}", step)
            t += d
            busy += d
            if loading and t > 0:  # copies landing meanwhile change what the policy sees
                advance(t)
                t = 0.0
            req = request_from_record(rec)
            plan = policy.plan(req, cache)
            release = no_release
            for ld in plan.loads:
                # a slot reused inside the call (not a new variant of the same expert: that one runs after its copy)
                if ld.victim is not None and ld.victim != ld.key and ld.victim in plan.execute:
                    if release is no_release:
                        release = {}
                    release[ld.victim] = env.event()
            if t > 0 and (plan.cpu or release or len(copies.free) < engines):
                advance(t)  # these interact with other processes: start them at the present
                t = 0.0
            waits: dict[Key, Transfer] = {k: loading[k] for k in plan.execute if k in loading} if loading else {}
            apply_plan(cache, req, plan, counters, variant_bytes, policy)
            if plan.loads or plan.prefetch:
                for tr in copies.issue(plan, step, release, env._now + t):
                    waits[tr.key] = tr
            # one token row, as routed (a decode call): every expert computes that one row
            one = rec.tokens == 1 and plan.topk is None
            counts = one_row if one else plan.tokens_per_expert(req)
            cpu_proc = None
            if plan.cpu:
                cpu_proc = env.process(self._cpu_experts([costs.cpu_expert_s(1 if one else counts[k[1]]) for k in plan.cpu]))
            # then the GPU experts in execution order, each once its weights are in
            for key in plan.order:
                tr = waits.get(key)
                if tr is not None:
                    if tr.end is None:  # still queued: wait for it in simulated time
                        alone = cpu_proc is None or cpu_proc.processed
                        if t > 0:
                            if alone:
                                advance(t)
                            else:
                                yield env.timeout(t)
                            t = 0.0
                        if tr.end is None:
                            w0 = env._now
                            ev = tr.event(env)
                            if not (alone and until(ev)):
                                yield ev
                            self.stall_s += env._now - w0
                            if tl is not None:
                                tl.add("gpu", w0, env._now, f"stall for L{key[0]}E{key[1]}", step)
                    if tr.end is not None and tr.end > env._now + t:  # it lands at a known time
                        self.stall_s += tr.end - (env._now + t)
                        if tl is not None:
                            tl.add("gpu", env._now + t, tr.end, f"stall for L{key[0]}E{key[1]}", step)
                        t = tr.end - env._now
                d = d_one if one else expert_s(counts[key[1]])
                if tl is not None:
                    tl.add("gpu", env._now + t, env._now + t + d, f"expert L{key[0]}E{key[1]}", step)
                t += d
                busy += d
                rel = release.get(key)
                if rel is not None:  # the slot is free once this expert has run
                    if cpu_proc is None or cpu_proc.processed:
                        advance(t)
                    else:
                        yield env.timeout(t)
                    t = 0.0
                    rel.succeed()
            if cpu_proc is not None:
                if t > 0:
                    yield env.timeout(t)
                    t = 0.0
                if not cpu_proc.processed:
                    w0 = env._now
                    yield cpu_proc
                    self.cpu_wait_s += env._now - w0
        self.gpu_busy_s = busy
        if t > 0:
            yield env.timeout(t)
        if step >= 0:
            self._end_step(step, phase, step_start, env._now)

    def _end_step(self, step: int, phase: str, start: float, end: float) -> None:
        self.steps.append(StepTime(step, phase, start, end))
        if self.timeline is not None and self.timeline.wants(step):
            self.timeline.steps.append((step, start, end))
        self.policy.observe(step)

    def run(self, records: Iterable[LayerRecord | StepRecord]) -> SimResult:
        host = None
        if self.costs.host is not None:
            from sim.host import HostDriver

            driver_obj = HostDriver(self)
            driver = self.env.process(driver_obj.run(records))
        else:
            driver = self.env.process(self._gpu_stream(records))
        self.env.run(until=driver)
        end = self.env.now
        if self.costs.host is not None:
            end = driver_obj.end
            host = driver_obj.metrics(end)
        # prefetches still queued or copying after the last compute do not delay any step
        return SimResult(self.counters, self.steps, end, self.stall_s, self.cpu_wait_s, self.gpu_busy_s,
                         min(self.copies.busy_s, end * self.copy_engines), self.copy_engines, host)
