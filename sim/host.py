"""The host as a timeline of its own (DESIGN section 5): the thread that plans each layer, submits
its copies and launches its kernels, and the compute stream that runs what it has been launched.

Per layer call, as the runtime does it (`runtime.offload.OffloadSession.layer_call`):

1. the host launches the layer's dense part (attention, router: `HostCost.layer`), and the stream
   runs it (`CostModel.dense_s`);
2. the host reads the routing back: it waits until the stream has run everything launched so far
   (a device sync on CUDA; on a synchronous device it already has; `HostCost.sync_routing`);
3. the policy plans (`HostCost.plan_for(policy)`), and the plan is applied (the counts);
4. each copy is handed to the link (`copy_s` each) and may start once it has been;
5. each GPU expert is launched (`expert`); on the stream it runs after its copy has landed;
6. the experts the plan runs on the CPU are computed by the host itself (`cpu_expert_s`), while
   the stream runs the GPU experts;

and at the end of a step the host waits for the stream (the runtime syncs there). The stream runs
ahead of the host only as far as a real one can: a launch returns once at most `queue_depth`
launched kernels are unfinished (0: a synchronous device, where the host waits for every kernel,
as on the CPU; a CUDA stream holds about a thousand, so there it is the syncs that bind).

Steps start and end on the host's clock, as the runtime measures them. The host runs ahead of the
SimPy clock while nothing it does can be observed, like the direct stream does, and lets the clock
catch up before the policy looks at the cache, before it hands the link a copy that a busy engine
could otherwise start too early, and when it must wait for the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import simpy

from policies import Key, LayerRequest, apply_plan
from policies.costs import HostCost
from sim.context import with_keys
from sim.copyengine import PREFETCH, URGENT, Transfer
from traces.schema import LayerRecord, StepRecord

if TYPE_CHECKING:
    from sim.engine import Simulation


class _Kernel:
    """Work launched onto the compute stream."""

    __slots__ = ("launch", "dur", "dep", "release", "label", "step", "cpu")

    def __init__(self, launch: float, dur: float, dep: Transfer | None, release: simpy.Event | None, label: str,
                 step: int, cpu: tuple[float, float] | None = None):
        self.launch, self.dur, self.dep, self.release, self.label, self.step, self.cpu = (
            launch, dur, dep, release, label, step, cpu)


def _memo(fn: Callable[[int], float]) -> Callable[[int], float]:
    table: dict[int, float] = {}

    def cost(n: int) -> float:
        v = table.get(n)
        if v is None:
            v = table[n] = fn(n)
        return v

    return cost


class HostDriver:
    """The `host` process and the compute stream it feeds, for one `Simulation`."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.env = sim.env
        self.h: HostCost = sim.costs.host  # type: ignore[assignment]
        self.depth = self.h.queue_depth
        self.pending: deque[_Kernel] = deque()  # launched kernels whose start is not yet known
        self.ends: deque[float] = deque(maxlen=self.depth + 1)  # the last kernels' ends, in launch order
        self.stream_end = 0.0  # when the stream has run every resolved kernel
        self.waiters: list[simpy.Event] = []  # the host, waiting for the stream to make progress
        self.host_t = 0.0  # the host's present (at or after the SimPy clock)
        self.host_busy_s = 0.0
        self.launch_wait_s = 0.0  # the stream idle, waiting for the host to launch its next kernel
        self.sync_wait_s = 0.0  # the host idle, waiting for the stream
        self.end = 0.0
        sim.copies.on_begin = self._copy_began

    # -- the compute stream ------------------------------------------------------------------------
    def _copy_began(self, tr: Transfer) -> None:
        if self.pending and self.pending[0].dep is tr:
            self._resolve()

    def _resolve(self) -> None:
        """Place the launched kernels on the stream, in order, as far as their copies' landing
        times are known; a kernel's copy that has not started holds it and all after it."""
        sim, tl, env = self.sim, self.sim.timeline, self.env
        progressed = False
        while self.pending:
            k = self.pending[0]
            ready = self.stream_end
            if k.launch > ready:  # the stream idles until the host launches it
                gap = k.launch - ready
                if k.cpu is not None:  # the host was computing the CPU experts meanwhile
                    a, b = k.cpu
                    ov = max(0.0, min(b, k.launch) - max(a, ready))
                    sim.cpu_wait_s += ov
                    gap -= ov
                self.launch_wait_s += gap
                ready = k.launch
            if k.dep is not None:
                if k.dep.end is None:
                    break
                if k.dep.end > ready:
                    sim.stall_s += k.dep.end - ready
                    if tl is not None:
                        tl.add("gpu", ready, k.dep.end, f"stall for L{k.dep.key[0]}E{k.dep.key[1]}", k.step)
                    ready = k.dep.end
            end = ready + k.dur
            if tl is not None:
                tl.add("gpu", ready, end, k.label, k.step)
            sim.gpu_busy_s += k.dur
            self.stream_end = end
            self.ends.append(end)
            self.pending.popleft()
            progressed = True
            if k.release is not None:  # the slot is free once this expert has run
                rel = k.release
                ev = env.timeout(max(end - env.now, 0.0))
                ev.callbacks.append(lambda _e, rel=rel: rel.succeed())
        if progressed and self.waiters:
            ws, self.waiters = self.waiters, []
            for w in ws:
                w.succeed()

    def _wait_stream(self) -> simpy.Event:
        ev = self.env.event()
        self.waiters.append(ev)
        return ev

    def _launch(self, k: _Kernel) -> Iterator[simpy.Event]:
        """Launch a kernel; return once at most `queue_depth` launched kernels are unfinished."""
        self.pending.append(k)
        if len(self.pending) == 1:
            self._resolve()
        while True:
            n = len(self.pending)
            if n > self.depth:
                yield from self._block()
                continue
            idx = self.depth - n  # among the resolved kernels, this one must have finished
            if len(self.ends) > idx:
                self._wait_until(self.ends[-(idx + 1)])
            return

    def _sync(self) -> Iterator[simpy.Event]:
        """Wait until the stream has run everything launched (a device sync)."""
        while self.pending:
            yield from self._block()
        self._wait_until(self.stream_end)

    def _block(self) -> Iterator[simpy.Event]:
        """Wait in simulated time until the stream can place another kernel (a copy starts)."""
        t0 = max(self.host_t, self.env.now)
        yield self._wait_stream()
        self.host_t = max(self.host_t, self.env.now)
        self.sync_wait_s += self.host_t - t0

    def _wait_until(self, t: float) -> None:
        if t > self.host_t:
            self.sync_wait_s += t - self.host_t
            self.host_t = t

    # -- the host ----------------------------------------------------------------------------------
    def _work(self, d: float, label: str, step: int) -> None:
        if d > 0:
            tl = self.sim.timeline
            if tl is not None:
                tl.add("host", self.host_t, self.host_t + d, label, step)
            self.host_t += d
            self.host_busy_s += d

    def _catch_up(self) -> Iterator[simpy.Event]:
        if self.host_t > self.env.now:
            yield self.env.timeout(self.host_t - self.env.now)

    def run(self, records: Iterable[LayerRecord | StepRecord]) -> Iterator[simpy.Event]:
        sim, env, h = self.sim, self.env, self.h
        cache, policy, costs, counters, copies = sim.cache, sim.policy, sim.costs, sim.counters, sim.copies
        from sim.engine import request_from_record

        loading = copies.loading
        dense_s = _memo(costs.dense_s)
        expert_s = _memo(costs.gpu_expert_s)
        step_s = _memo(costs.step)
        layer_s = _memo(h.layer)
        plan_s = _memo(h.plan_for(policy.spec))
        launch_s = _memo(h.expert)
        per_key = costs.dense_per_key_s
        stream: Iterable[tuple[LayerRecord, int]] = (
            with_keys(records) if per_key else ((r, 0) for r in records if isinstance(r, (LayerRecord, LayerRequest)))
        )
        step, phase, step_start = -1, "decode", 0.0
        cpu_iv: tuple[float, float] | None = None
        for rec, keys in stream:
            if rec.step != step:
                if step >= 0:
                    yield from self._sync()  # the runtime syncs at the end of every step
                    sim._end_step(step, phase, step_start, self.host_t)
                step, phase, step_start = rec.step, rec.phase, self.host_t
                self._work(h.step_s, "step", step)
                d = step_s(rec.tokens)
                if d > 0:
                    yield from self._launch(_Kernel(self.host_t, d, None, None, "step", step, cpu_iv))
                    cpu_iv = None
                if sim.nonmoe_layers:
                    self._work(sim.nonmoe_layers * h.dense_layer_s, "launch dense layers", step)
                    d = sim.nonmoe_layers * (dense_s(rec.tokens) + per_key * keys)
                    yield from self._launch(_Kernel(self.host_t, d, None, None, "dense layers", step, cpu_iv))
                    cpu_iv = None
            layer = rec.layer
            self._work(layer_s(rec.tokens), f"launch L{layer}", step)
            d = dense_s(rec.tokens) + per_key * keys if keys else dense_s(rec.tokens)
            yield from self._launch(_Kernel(self.host_t, d, None, None, f"dense L{layer}", step, cpu_iv))
            cpu_iv = None
            if h.sync_routing:
                yield from self._sync()  # the routing is read back: the dense part has run
            if loading:  # copies landing meanwhile change what the policy sees
                yield from self._catch_up()
            self._work(plan_s(rec.tokens), f"plan L{layer}", step)
            req = request_from_record(rec)
            plan = policy.plan(req, cache)
            release: dict[Key, simpy.Event] = {}
            for ld in plan.loads:
                # a slot reused inside the call (not a new variant of the same expert: that one runs after its copy)
                if ld.victim is not None and ld.victim != ld.key and ld.victim in plan.execute:
                    release[ld.victim] = env.event()
            waits: dict[Key, Transfer] = {k: loading[k] for k in plan.execute if k in loading} if loading else {}
            apply_plan(cache, req, plan, counters, costs.variant_bytes, policy)
            for prio, group in ((URGENT, plan.loads), (PREFETCH, plan.prefetch)):
                for ld in group:
                    self._work(h.copy_s, f"submit L{ld.key[0]}E{ld.key[1]}", step)
                    tr = copies.transfer(ld.key, ld.victim, ld.variant, step, prio == URGENT, release)
                    if not copies.can_submit_at(tr, self.host_t):
                        yield from self._catch_up()  # the link sees it when the host hands it over
                    copies.submit(tr, prio, max(self.host_t, env.now))
                    if prio == URGENT:
                        waits[tr.key] = tr
            counts = plan.tokens_per_expert(req)
            for key in plan.order:
                n = counts[key[1]]
                self._work(launch_s(n), f"launch L{key[0]}E{key[1]}", step)
                tr = waits.get(key)
                k = _Kernel(self.host_t, expert_s(n), tr, release.get(key), f"expert L{key[0]}E{key[1]}", step, cpu_iv)
                cpu_iv = None
                yield from self._launch(k)
            if plan.cpu:  # the host computes them itself, while the stream runs the GPU experts
                a = self.host_t
                for key in plan.cpu:
                    self._work(costs.cpu_expert_s(counts[key[1]]), f"cpu L{key[0]}E{key[1]}", step)
                cpu_iv = (a, self.host_t)
        if step >= 0:
            yield from self._sync()
            if cpu_iv is not None:  # the last call's CPU experts, after the stream had finished
                sim.cpu_wait_s += max(0.0, cpu_iv[1] - max(cpu_iv[0], self.stream_end))
            sim._end_step(step, phase, step_start, self.host_t)
        self.end = self.host_t
        yield from self._catch_up()

    def metrics(self, span: float) -> dict[str, float]:
        return {
            "host_busy_frac": self.host_busy_s / span if span else 0.0,
            "host_sync_wait_s": self.sync_wait_s,
            "launch_wait_s": self.launch_wait_s,
        }
