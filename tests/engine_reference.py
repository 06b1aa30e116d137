"""The engine's compute stream as it was before it learned to wait without suspending (kept as the
reference `tests/test_engine_fast.py` holds the engine to): every wait a SimPy Timeout and a
suspension of the generator. Only `_gpu_stream` differs from `sim.engine.Simulation`; a change to
the engine's model (not to its speed) belongs in both."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import simpy

from policies import Key, LayerRequest, apply_plan
from sim.context import with_keys
from sim.copyengine import Transfer
from sim.engine import Simulation, _memo, request_from_record
from traces.schema import LayerRecord, StepRecord


class ReferenceSimulation(Simulation):
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
        stream: Iterable[tuple[LayerRecord, int]] = (
            with_keys(records) if per_key else ((r, 0) for r in records if isinstance(r, (LayerRecord, LayerRequest)))
        )
        for rec, keys in stream:
            if rec.step != step:
                if step >= 0:
                    self._end_step(step, phase, step_start, env.now + t)
                step, phase, step_start = rec.step, rec.phase, env.now + t
                d = step_s(rec.tokens)  # the step's own overhead (embeddings, LM head, sampling)
                t += d
                self.gpu_busy_s += d
                if self.nonmoe_layers:
                    d = self.nonmoe_layers * (dense_s(rec.tokens) + per_key * keys)
                    if tl is not None:
                        tl.add("gpu", env.now + t, env.now + t + d, "dense layers", step)
                    t += d
                    self.gpu_busy_s += d
            # the dense part (attention, router) first: the router's choice exists only after it
            d = dense_s(rec.tokens) + per_key * keys if keys else dense_s(rec.tokens)
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
            if t > 0 and (plan.cpu or release or len(copies.free) < engines):
                yield env.timeout(t)  # these interact with other processes: start them at the present
                t = 0.0
            waits: dict[Key, Transfer] = {k: loading[k] for k in plan.execute if k in loading} if loading else {}
            apply_plan(cache, req, plan, counters, variant_bytes, policy)
            if plan.loads or plan.prefetch:
                for tr in copies.issue(plan, step, release, env.now + t):
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
