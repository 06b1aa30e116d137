"""The engine against its reference (`tests/engine_reference.py`: every wait a SimPy Timeout and a
suspension): the same metrics, steps, counters and timeline intervals, bit for bit, on random traces
under every kind of plan (demand loads, prefetches, CPU experts, slots reused inside a call, low
precision variants, substitutions, oracles), one and two copy engines, and costs chosen so that many
events fall on the same instant (where SimPy's event order decides)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from policies import make_policy
from policies.costs import variant_bytes
from sim import calls
from sim.config import CacheConfig
from sim.engine import Simulation, Timeline
from sim.hardware import HardwareProfile, load_profile
from traces.columnar import read_columnar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_reference import ReferenceSimulation  # noqa: E402
from replay_golden import _steps, _write_steps  # noqa: E402

from traces.synthetic import iid_calls, toy_model, write_trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _profile(tmp: Path, name: str, *, latency: float, dense: float, gpu: float, cpu: float, engines: int,
             gbps: float = 1e9) -> HardwareProfile:
    prof = load_profile("rtx4090").model_dump()
    prof.update(name=name, source="calibrated")
    prof["link"].update(latency_us=latency * 1e6, h2d_gbps=gbps, d2h_gbps=gbps, copy_engines=engines)
    zero = {"fixed_s": 0.0, "per_token_s": 0.0, "floor_s": 0.0}
    prof["fit"] = {"model": "toy", "dense": {**zero, "fixed_s": dense}, "gpu_expert": {**zero, "fixed_s": gpu, "per_token_s": gpu / 4},
                   "cpu_expert": {**zero, "fixed_s": cpu, "per_token_s": cpu / 8}}
    return HardwareProfile.model_validate(prof)


def _run(cls: type[Simulation], trace: Path, spec: str, cache: CacheConfig, profile: HardwareProfile) -> dict[str, Any]:
    col = read_columnar(trace, cache=False)
    model = col.header.model
    pol = make_policy(spec)
    ca = cache.build(model)
    costs = profile.cost_model(model, variant_bytes(model, pol))
    pol.reset(model, ca, costs, calls.future(col) if pol.wants_future() else None)
    tl = Timeline(max_steps=10**6)
    res = cls(model, pol, ca, costs, copy_engines=profile.link.copy_engines, timeline=tl).run(calls.requests(col))
    return {
        "metrics": json.dumps(res.metrics(), sort_keys=True),
        "steps": [(s.step, s.phase, s.start, s.end) for s in res.steps],
        "intervals": [(i.lane, i.start, i.end, i.label, i.step) for i in tl.intervals],
        "cache": sorted(ca.resident.items()),
    }


POLICIES = ["lru", "lfu", "fifo", "random(seed=3)", "belady", "static", "lru+lookahead(depth=2, budget=3)",
            "lru+lookahead(depth=2, budget=6)", "moe-infinity(budget=3)", "lru+fiddler", "lfu+fiddler", "adaptive-k(threshold=0.3)",
            "hobbit", "hobbit(bits=8, threshold=0.6)", "substitute", "buddy"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("fast")
    out = []
    for seed, (layers, experts, top_k, n, every, rows) in enumerate([(4, 8, 2, 60, 15, 4), (3, 8, 2, 30, 4, 6), (2, 16, 4, 40, 10, 3)]):
        m = toy_model(num_layers=layers, num_experts=experts, top_k=top_k, expert_bytes=1000)
        out.append(_write_steps(tmp / f"t{seed}.jsonl", m, _steps(random.Random(seed), layers, experts, top_k, n, every, rows), 2))
    p = tmp / "iid.jsonl"
    write_trace(p, toy_model(num_layers=2, num_experts=8, top_k=2, expert_bytes=1000), iid_calls([1.0] * 8, 300, num_layers=2, top_k=2))
    out.append(p)
    return out


@pytest.mark.parametrize("spec", POLICIES)
def test_the_engine_equals_its_reference(tmp_path: Path, traces: list[Path], spec: str) -> None:
    rng = random.Random(spec)
    profiles = [
        # a copy, a dense part and an expert all 1e-4 s: many events on the same instant
        _profile(tmp_path, "grid", latency=0.0, gbps=0.01, dense=1e-4, gpu=1e-4, cpu=2e-4, engines=1),
        _profile(tmp_path, "grid2", latency=0.0, gbps=0.01, dense=1e-4, gpu=1e-4, cpu=1e-4, engines=2),
        _profile(tmp_path, "two", latency=3e-4, dense=1e-4, gpu=5e-5, cpu=1e-4, engines=2),
        _profile(tmp_path, "odd", latency=rng.uniform(1e-5, 1e-3), dense=rng.uniform(1e-5, 1e-4), gpu=rng.uniform(1e-6, 1e-4),
                 cpu=rng.uniform(1e-6, 1e-3), engines=rng.choice([1, 2, 3])),
    ]
    ran = 0
    for trace in traces:
        top_k = read_columnar(trace, cache=False).header.model.top_k
        for size in (CacheConfig(experts=top_k + 1), CacheConfig(per_layer=top_k + 1)):
            for prof in profiles:
                try:
                    want = _run(ReferenceSimulation, trace, spec, size, prof)
                except Exception as exc:  # a policy this trace cannot run (a field it lacks): both refuse alike
                    with pytest.raises(type(exc)):
                        _run(Simulation, trace, spec, size, prof)
                    continue
                got = _run(Simulation, trace, spec, size, prof)
                assert got == want, (trace.name, spec, size, prof.name)
                ran += 1
    assert ran >= 12


@pytest.mark.parametrize("spec", ["lru", "lru+lookahead(depth=2, budget=3)", "lru+fiddler", "belady"])
def test_the_engine_equals_its_reference_on_the_shipped_traces(spec: str) -> None:
    for name, size in (("mixtral-8x7b-gsm8k.jsonl.gz", CacheConfig(per_layer=3)), ("zoo-coarse.jsonl.gz", CacheConfig(experts=12))):
        trace = ROOT / "traces" / name
        prof = load_profile("rtx4090")
        try:
            want = _run(ReferenceSimulation, trace, spec, size, prof)
        except Exception as exc:
            with pytest.raises(type(exc)):
                _run(Simulation, trace, spec, size, prof)
            continue
        assert _run(Simulation, trace, spec, size, prof) == want
