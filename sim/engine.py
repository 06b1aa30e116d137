"""The SimPy model of an offloaded MoE forward pass (DESIGN section 5).

Hardware is modelled as SimPy processes and resources named for what they are:

- `gpu_stream`: the compute stream. One generator walks the trace layer by layer: the dense part of
  the layer, then the plan's GPU experts in execution order, each waiting for its own weights, so
  copies and computes pipeline inside a layer.
- `h2d_engine`: the copy engine(s), fed by a priority queue (urgent loads before prefetches, FIFO
  within each class, a started copy never pre-empted). A copy into a slot first waits for the slot's
  previous occupant to be released: its own copy done, and its compute done if the current call
  uses it.
- `cpu`: a resource for experts the plan runs on the host (Fiddler-style).

The policy sees the cache at plan time; `policies.apply_plan` changes the cache and the counters, so
hit counts do not depend on timing and equal the runtime's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from policies import Counters, ExpertCache, Future, Key, LayerPlan, LayerRequest, Policy, apply_plan
from policies.costs import CostModel
from traces.schema import LayerRecord, ModelSpec, StepRecord

URGENT, PREFETCH = 0, 1


def request_from_record(rec: LayerRecord) -> LayerRequest:
    """The policy's view of one trace record (float64 weights, as the runtime builds them)."""
    return LayerRequest(
        step=rec.step,
        phase=rec.phase,
        layer=rec.layer,
        topk=np.asarray(rec.topk, dtype=np.int64),
        weights=np.asarray(rec.weights, dtype=np.float64),
        probs=None if rec.probs is None else np.asarray(rec.probs, dtype=np.float64),
        lookahead=None if rec.lookahead is None else {int(k): np.asarray(v, dtype=np.int64) for k, v in rec.lookahead.items()},
        importance=None if rec.importance is None else np.asarray(rec.importance, dtype=np.float64),
    )


def future_of(records: Iterable[LayerRecord | StepRecord]) -> Future:
    """Every layer call's keys in access order: what oracle policies are given at reset."""
    calls = [request_from_record(r).keys_in_access_order() for r in records if isinstance(r, LayerRecord)]
    return Future(calls)


@dataclass(slots=True)
class Interval:
    lane: str
    start: float
    end: float
    label: str
    step: int


@dataclass
class Timeline:
    """Intervals of the first `max_steps` steps, for the Gantt chart; nothing is kept past them."""

    max_steps: int = 4
    intervals: list[Interval] = field(default_factory=list)

    def add(self, lane: str, start: float, end: float, label: str, step: int) -> None:
        if step < self.max_steps and end > start:
            self.intervals.append(Interval(lane, start, end, label, step))


@dataclass(slots=True)
class _Transfer:
    key: Key
    nbytes: int
    done: simpy.Event
    wait: list[simpy.Event]
    step: int
    urgent: bool


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
    gpu_busy_s: float
    link_busy_s: float
    copy_engines: int

    def metrics(self) -> dict[str, Any]:
        c = self.counters
        prefill = [s for s in self.steps if s.phase == "prefill"]
        decode = [s for s in self.steps if s.phase == "decode"]
        # TTFT: every maximal run of consecutive prefill steps (a prompt's chunks) ends with a first token
        runs: list[float] = []
        run_start: float | None = None
        prev_end = 0.0
        for s in self.steps:
            if s.phase == "prefill" and run_start is None:
                run_start = s.start
            if s.phase == "decode" and run_start is not None:
                runs.append(prev_end - run_start)
                run_start = None
            prev_end = s.end
        if run_start is not None:
            runs.append(prev_end - run_start)
        mass = c.routed_mass or 1.0
        return {
            "layer_calls": c.layer_calls,
            "steps": len(self.steps),
            "prefill_steps": len(prefill),
            "decode_steps": len(decode),
            "accesses": c.accesses,
            "hits": c.hits,
            "inflight_hits": c.inflight_hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate,
            "prefetches": c.prefetches,
            "wasted_prefetches": c.wasted_prefetches,
            "cpu_experts": c.cpu_experts,
            "bytes_h2d": c.bytes_h2d,
            "stall_s": self.stall_s,
            "ttft_s": sum(runs) / len(runs) if runs else None,
            "tpot_s": sum(s.end - s.start for s in decode) / len(decode) if decode else None,
            "total_s": self.makespan_s,
            "gpu_busy_frac": self.gpu_busy_s / self.makespan_s if self.makespan_s else 0.0,
            "link_busy_frac": self.link_busy_s / (self.copy_engines * self.makespan_s) if self.makespan_s else 0.0,
            "dropped_mass": c.dropped_mass / mass,
            "substituted_mass": c.substituted_mass / mass,
        }


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
        self.h2d_queue = simpy.PriorityStore(self.env)
        self.cpu = simpy.Resource(self.env, capacity=1)
        self.copy_engines = copy_engines
        self.loading: dict[Key, simpy.Event] = {}  # key -> its copy's done event, while in flight
        self._seq = itertools.count()
        self.steps: list[StepTime] = []
        self.stall_s = 0.0
        self.gpu_busy_s = 0.0
        self.link_busy_s = 0.0
        self.nonmoe_layers = model.num_layers - model.num_moe_layers
        for i in range(copy_engines):
            self.env.process(self._h2d_engine(i))

    # -- the copy engine ---------------------------------------------------------------------------
    def _h2d_engine(self, index: int) -> Iterator[simpy.Event]:
        env, costs, tl = self.env, self.costs, self.timeline
        lane = f"h2d{index}"
        while True:
            item = yield self.h2d_queue.get()
            tr: _Transfer = item[2]
            for ev in tr.wait:
                if not ev.processed:
                    yield ev
            start = env.now
            yield env.timeout(costs.h2d_latency_s + tr.nbytes / costs.h2d_bytes_per_s)
            self.link_busy_s += env.now - start
            if tl is not None:
                tl.add(lane, start, env.now, f"{'load' if tr.urgent else 'prefetch'} L{tr.key[0]}E{tr.key[1]}", tr.step)
            if self.loading.get(tr.key) is tr.done:
                del self.loading[tr.key]
                self.cache.complete(tr.key)
            tr.done.succeed()

    def _issue(self, plan: LayerPlan, step: int, release: dict[Key, simpy.Event]) -> dict[Key, simpy.Event]:
        """Queue the plan's copies; returns the done events of its urgent loads."""
        env, loading, sizes = self.env, self.loading, self.costs.variant_bytes
        urgent: dict[Key, simpy.Event] = {}
        for ld, prio in itertools.chain(((x, URGENT) for x in plan.loads), ((x, PREFETCH) for x in plan.prefetch)):
            wait = []
            if ld.victim is not None:
                prev = loading.pop(ld.victim, None)  # evicting a key still in flight: wait for its copy
                if prev is not None:
                    wait.append(prev)
                rel = release.get(ld.victim)
                if rel is not None:
                    wait.append(rel)
            done = env.event()
            loading[ld.key] = done
            tr = _Transfer(ld.key, sizes[ld.variant], done, wait, step, prio == URGENT)
            self.h2d_queue.put((prio, next(self._seq), tr))
            if prio == URGENT:
                urgent[ld.key] = done
        return urgent

    # -- the compute stream ------------------------------------------------------------------------
    def _cpu_experts(self, costs: list[float]) -> Iterator[simpy.Event]:
        with self.cpu.request() as req:
            yield req
            yield self.env.timeout(sum(costs))

    def _gpu_stream(self, records: Iterable[LayerRecord | StepRecord]) -> Iterator[simpy.Event]:
        env, cache, policy, costs, counters = self.env, self.cache, self.policy, self.costs, self.counters
        tl = self.timeline
        loading = self.loading
        variant_bytes = costs.variant_bytes
        step = -1
        phase = "decode"
        step_start = 0.0
        for rec in records:
            if not isinstance(rec, LayerRecord):
                continue
            if rec.step != step:
                if step >= 0:
                    self._end_step(step, phase, step_start)
                step, phase, step_start = rec.step, rec.phase, env.now
                if self.nonmoe_layers:
                    t = self.nonmoe_layers * costs.dense_s(rec.tokens)
                    if tl is not None:
                        tl.add("gpu", env.now, env.now + t, "dense layers", step)
                    self.gpu_busy_s += t
                    yield env.timeout(t)
            req = request_from_record(rec)
            plan = policy.plan(req, cache)
            release: dict[Key, simpy.Event] = {}
            if plan.loads:
                need = set(plan.execute)
                for v in plan.evictions:
                    if v in need:
                        release[v] = env.event()
            waits = {k: loading[k] for k in plan.execute if k in loading}  # in-flight before this call
            apply_plan(cache, req, plan, counters, variant_bytes)
            if plan.loads or plan.prefetch:
                waits.update(self._issue(plan, step, release))
            cpu_proc = None
            if plan.cpu:
                counts = plan.tokens_per_expert(req)
                cpu_proc = env.process(self._cpu_experts([costs.cpu_expert_s(counts[k[1]]) for k in plan.cpu]))
            # dense part, then the experts; consecutive ready work is one timeout
            t = costs.dense_s(rec.tokens)
            if tl is not None:
                tl.add("gpu", env.now, env.now + t, f"dense L{rec.layer}", step)
            counts = plan.tokens_per_expert(req)
            for key in plan.order:
                ev = waits.get(key)
                if ev is not None and not ev.processed:
                    if t > 0:
                        self.gpu_busy_s += t
                        yield env.timeout(t)
                        t = 0.0
                    w0 = env.now
                    yield ev
                    self.stall_s += env.now - w0
                dt = costs.gpu_expert_s(counts[key[1]])
                if tl is not None:
                    tl.add("gpu", env.now + t, env.now + t + dt, f"expert L{key[0]}E{key[1]}", step)
                t += dt
                rel = release.get(key)
                if rel is not None:
                    self.gpu_busy_s += t
                    yield env.timeout(t)
                    t = 0.0
                    rel.succeed()
            if t > 0:
                self.gpu_busy_s += t
                yield env.timeout(t)
            if cpu_proc is not None and not cpu_proc.processed:
                w0 = env.now
                yield cpu_proc
                self.stall_s += env.now - w0
        if step >= 0:
            self._end_step(step, phase, step_start)

    def _end_step(self, step: int, phase: str, start: float) -> None:
        self.steps.append(StepTime(step, phase, start, self.env.now))
        self.policy.observe(step)

    def run(self, records: Iterable[LayerRecord | StepRecord]) -> SimResult:
        driver = self.env.process(self._gpu_stream(records))
        self.env.run(until=driver)
        end = self.env.now
        # prefetches still queued or copying after the last compute do not delay any step
        return SimResult(self.counters, self.steps, end, self.stall_s, self.gpu_busy_s, min(self.link_busy_s, end * self.copy_engines), self.copy_engines)
