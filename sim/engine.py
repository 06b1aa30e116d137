"""The SimPy model of an offloaded MoE forward pass (DESIGN section 5).

Hardware is modelled as SimPy processes and resources named for what they are:

- `gpu_stream`: the compute stream. One generator walks the trace layer by layer: the dense part of
  the layer, then the plan's GPU experts in execution order, each waiting for its own weights, so
  copies and computes pipeline inside a layer.
- `h2d_engine`: the copy engine(s), fed by a priority queue (urgent loads before prefetches, FIFO
  within each class, a started copy never pre-empted). A copy into a slot first waits for the slot's
  previous occupant to be released: its own copy done, and its compute done if the current call
  uses it; it waits off the queue, so the engines copy something else meanwhile.
- `cpu`: a resource for experts the plan runs on the host (Fiddler-style).

The policy sees the cache at plan time (after the layer's dense part: the router decides then);
`policies.apply_plan` changes the cache and the counters, so hits + in-flight hits, misses and bytes
do not depend on timing and equal the runtime's. Only the split between `hits` and `inflight_hits`
(a prefetch still copying when it is used) is timing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import simpy

from policies import Counters, ExpertCache, Future, Key, LayerPlan, LayerRequest, Policy, apply_plan
from policies.costs import CostModel
from traces.schema import LayerRecord, ModelSpec, StepRecord

URGENT, PREFETCH = 0, 1


def request_from_record(rec: LayerRecord) -> LayerRequest:
    """The policy's view of one trace record; the rows become numpy arrays if a policy asks."""
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


@dataclass(slots=True)
class _Transfer:
    key: Key
    nbytes: int
    wait: list[simpy.Event]
    step: int
    urgent: bool
    copy: simpy.Event | None = None  # the Timeout, once the copy has started
    end: float | None = None  # when it lands, once started
    waiter: simpy.Event | None = None  # for whoever must wait before it has started
    dep: _Transfer | None = None  # the copy out of this one's slot (its victim's), if it was still in flight
    state: str = "queued"  # "queued", "parked" (off the queue until its slot is free) or "taken" (started)
    prio: int = 0  # its place in the copy queue: (prio, seq)
    seq: int = 0

    def event(self, env: simpy.Environment) -> simpy.Event:
        """An event that fires when the copy lands."""
        if self.copy is not None:
            return self.copy
        if self.waiter is None:
            self.waiter = env.event()
        return self.waiter


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
        # the copy queue: (priority, seq, transfer) in a heap; `_h2d_free` lists idle engines
        self.h2d_queue: list[tuple[int, int, int, _Transfer]] = []  # (prio, seq, tiebreak, transfer)
        self._h2d_free: list[int] = list(range(copy_engines))
        self.cpu = simpy.Resource(self.env, capacity=1)
        self.copy_engines = copy_engines
        self.loading: dict[Key, _Transfer] = {}  # keys whose copy is queued or running
        self._seq = itertools.count()
        self.steps: list[StepTime] = []
        self.stall_s = 0.0  # the GPU waiting for copies
        self.cpu_wait_s = 0.0  # the GPU waiting for experts run on the CPU
        self.gpu_busy_s = 0.0
        self.link_busy_s = 0.0
        self.nonmoe_layers = model.num_layers - model.num_moe_layers

    # -- the copy engines ---------------------------------------------------------------------------
    # A server in SimPy's own style (as its resources are built): a started copy is a Timeout whose
    # callback finishes it and starts the next, so an uncontended copy costs one event.
    def _push(self, tr: _Transfer, prio: int | None = None) -> None:
        """Queue a copy: a new one at the end of its class, a parked one back at its old place."""
        if prio is not None:
            tr.prio, tr.seq = prio, next(self._seq)
        tr.state = "queued"
        heapq.heappush(self.h2d_queue, (tr.prio, tr.seq, next(self._seq), tr))

    def _h2d_start(self, at: float | None = None) -> None:
        while self._h2d_free and self.h2d_queue:
            entry = heapq.heappop(self.h2d_queue)
            tr = entry[3]
            if tr.state != "queued":  # a stale entry: the copy was taken along by one into its slot (below)
                continue
            # A copy whose slot's previous copy is still queued (an urgent load evicted a prefetch that
            # has not started) would wait behind a copy it outranks: that copy goes first, on this
            # engine, and this one goes back to its place.
            run = tr
            while run.dep is not None and run.dep.state == "queued":
                run = run.dep
            if run is not tr:
                heapq.heappush(self.h2d_queue, entry)
                tr = run
            pending = [ev for ev in tr.wait if not ev.processed]
            if pending:  # its slot is not free yet: off the queue, without an engine, until it is
                self._h2d_park(tr, pending)
                continue
            tr.state = "taken"
            self._h2d_free.sort()
            self._h2d_begin(tr, self._h2d_free.pop(0), self.env.now if at is None else at)

    def _h2d_park(self, tr: _Transfer, pending: list[simpy.Event]) -> None:
        """A copy whose slot is still in use (its previous occupant's copy running, or its compute in
        the current call not done) leaves the queue and takes no engine, so the engines copy what
        can be copied meanwhile (a prefetch the compute stream waits for, say); once the slot is
        free it goes back to its old place in the queue, ahead of everything queued after it."""
        tr.state = "parked"

        def retry(_: simpy.Event) -> None:
            rest = [ev for ev in pending if not ev.processed]
            if rest:
                rest[0].callbacks.append(retry)
            else:
                self._push(tr)
                self._h2d_start()

        pending[0].callbacks.append(retry)

    def _h2d_begin(self, tr: _Transfer, lane: int, start: float) -> None:
        env = self.env
        duration = self.costs.h2d_latency_s + tr.nbytes / self.costs.h2d_bytes_per_s
        tr.end = start + duration
        tr.copy = env.timeout(tr.end - env.now)
        tr.copy.callbacks.append(partial(self._h2d_finish, tr, lane, start))

    def _h2d_finish(self, tr: _Transfer, lane: int, start: float, _: simpy.Event) -> None:
        now = self.env.now
        self.link_busy_s += now - start
        if self.timeline is not None:
            kind = "load" if tr.urgent else "prefetch"
            self.timeline.add(f"h2d{lane}", start, now, f"{kind} L{tr.key[0]}E{tr.key[1]}", tr.step)
        if self.loading.get(tr.key) is tr:
            del self.loading[tr.key]
            self.cache.complete(tr.key)
        if tr.waiter is not None:
            tr.waiter.succeed()
        self._h2d_free.append(lane)
        self._h2d_start()

    def _issue(self, plan: LayerPlan, step: int, release: dict[Key, simpy.Event], at: float) -> list[_Transfer]:
        """Queue the plan's copies and start what can start (at time `at`: the compute stream's
        present, when it runs ahead of the clock with nothing in flight); returns the urgent ones."""
        loading, sizes, env = self.loading, self.costs.variant_bytes, self.env
        urgent: list[_Transfer] = []
        for prio, group in ((URGENT, plan.loads), (PREFETCH, plan.prefetch)):
            for ld in group:
                wait = []
                dep = None
                if ld.victim is not None:
                    prev = loading.pop(ld.victim, None)  # evicting a key still in flight: wait for its copy
                    if prev is not None:
                        wait.append(prev.event(env))
                        dep = prev
                    rel = release.get(ld.victim)
                    if rel is not None:
                        wait.append(rel)
                tr = _Transfer(ld.key, sizes[ld.variant], wait, step, prio == URGENT)
                if dep is not None and dep.state != "taken":
                    tr.dep = dep
                loading[ld.key] = tr
                if not wait and not self.h2d_queue and self._h2d_free:  # an idle engine takes it at once
                    tr.state = "taken"
                    self._h2d_free.sort()
                    self._h2d_begin(tr, self._h2d_free.pop(0), at)
                else:
                    self._push(tr, prio)
                    self._h2d_start(at)
                if prio == URGENT:
                    urgent.append(tr)
        return urgent

    # -- the compute stream ------------------------------------------------------------------------
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
        loading = self.loading
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
        for rec in records:
            if not isinstance(rec, LayerRecord):
                continue
            if rec.step != step:
                if step >= 0:
                    self._end_step(step, phase, step_start, env.now + t)
                step, phase, step_start = rec.step, rec.phase, env.now + t
                d = step_s(rec.tokens)  # the step's own overhead (embeddings, LM head, sampling)
                t += d
                self.gpu_busy_s += d
                if self.nonmoe_layers:
                    d = self.nonmoe_layers * dense_s(rec.tokens)
                    if tl is not None:
                        tl.add("gpu", env.now + t, env.now + t + d, "dense layers", step)
                    t += d
                    self.gpu_busy_s += d
            # the dense part (attention, router) first: the router's choice exists only after it
            d = dense_s(rec.tokens)
            if tl is not None:
                tl.add("gpu", env.now + t, env.now + t + d, f"dense L{rec.layer}", step)
            t += d
            self.gpu_busy_s += d
            if loading and t > 0:  # copies landing meanwhile change what the policy sees
                yield env.timeout(t)
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
            if t > 0 and (plan.cpu or release or len(self._h2d_free) < engines):
                yield env.timeout(t)  # these interact with other processes: start them at the present
                t = 0.0
            waits = {k: loading[k] for k in plan.execute if k in loading} if loading else {}
            apply_plan(cache, req, plan, counters, variant_bytes)
            if plan.loads or plan.prefetch:
                for tr in self._issue(plan, step, release, env.now + t):
                    waits[tr.key] = tr
            counts = plan.tokens_per_expert(req)
            cpu_proc = None
            if plan.cpu:
                cpu_proc = env.process(self._cpu_experts([costs.cpu_expert_s(counts[k[1]]) for k in plan.cpu]))
            # then the GPU experts in execution order, each once its weights are in
            for key in plan.order:
                tr = waits.get(key)
                if tr is not None:
                    if tr.end is None:  # still queued: wait for it in simulated time
                        if t > 0:
                            yield env.timeout(t)
                            t = 0.0
                        if tr.end is None:
                            w0 = env.now
                            yield tr.event(env)
                            self.stall_s += env.now - w0
                            if tl is not None:
                                tl.add("gpu", w0, env.now, f"stall for L{key[0]}E{key[1]}", step)
                    if tr.end is not None and tr.end > env.now + t:  # it lands at a known time
                        self.stall_s += tr.end - (env.now + t)
                        if tl is not None:
                            tl.add("gpu", env.now + t, tr.end, f"stall for L{key[0]}E{key[1]}", step)
                        t = tr.end - env.now
                d = expert_s(counts[key[1]])
                if tl is not None:
                    tl.add("gpu", env.now + t, env.now + t + d, f"expert L{key[0]}E{key[1]}", step)
                t += d
                self.gpu_busy_s += d
                rel = release.get(key)
                if rel is not None:  # the slot is free once this expert has run
                    yield env.timeout(t)
                    t = 0.0
                    rel.succeed()
            if cpu_proc is not None:
                if t > 0:
                    yield env.timeout(t)
                    t = 0.0
                if not cpu_proc.processed:
                    w0 = env.now
                    yield cpu_proc
                    self.cpu_wait_s += env.now - w0
        if t > 0:
            yield env.timeout(t)
        if step >= 0:
            self._end_step(step, phase, step_start, env.now)

    def _end_step(self, step: int, phase: str, start: float, end: float) -> None:
        self.steps.append(StepTime(step, phase, start, end))
        if self.timeline is not None and self.timeline.wants(step):
            self.timeline.steps.append((step, start, end))
        self.policy.observe(step)

    def run(self, records: Iterable[LayerRecord | StepRecord]) -> SimResult:
        driver = self.env.process(self._gpu_stream(records))
        self.env.run(until=driver)
        end = self.env.now
        # prefetches still queued or copying after the last compute do not delay any step
        return SimResult(self.counters, self.steps, end, self.stall_s, self.cpu_wait_s, self.gpu_busy_s, min(self.link_busy_s, end * self.copy_engines), self.copy_engines)
