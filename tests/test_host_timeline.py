"""The simulator's host timeline (`sim.host`) against closed forms: N layers, each with one expert
that misses, host cost h per layer (the policy's planning), copy p, compute c."""

from __future__ import annotations

import dataclasses

import pytest

from policies import make_policy
from policies.costs import ComputeCost, CostModel, HostCost
from sim.config import CacheConfig
from sim.engine import Simulation, Timeline
from traces.schema import LayerRecord, ModelSpec, StepRecord

EB = 1000  # bytes of one expert


def model(n_layers: int) -> ModelSpec:
    return ModelSpec(name="toy", arch="mixtral", num_layers=n_layers, moe_layers=list(range(n_layers)), num_experts=4,
                     top_k=1, hidden_size=8, moe_intermediate_size=8, dtype="bf16", expert_bytes=EB, dense_bytes=0)


def one_step(n_layers: int, expert: int = 0, step: int = 0) -> list[LayerRecord | StepRecord]:
    recs: list[LayerRecord | StepRecord] = [
        LayerRecord(step=step, phase="decode", layer=i, tokens=1, topk=[[expert]], weights=[[1.0]]) for i in range(n_layers)
    ]
    return [*recs, StepRecord(step=step, phase="decode", seq_ids=[0])]


def costs(p: float, c: float, host: HostCost | None, dense: float = 0.0, cpu: float = 0.0) -> CostModel:
    # a copy of EB bytes takes exactly p: all of it latency
    return CostModel(p, 1e30, {"full": EB}, ComputeCost(dense), ComputeCost(c), ComputeCost(cpu), host=host)


def simulate(n_layers: int, cm: CostModel, policy: str = "lru", records=None, timeline=None):  # type: ignore[no-untyped-def]
    spec = model(n_layers)
    pol = make_policy(policy)
    cache = CacheConfig(per_layer=1).build(spec)
    pol.reset(spec, cache, cm, None)
    sim = Simulation(spec, pol, cache, cm, timeline=timeline)
    return sim.run(records if records is not None else one_step(n_layers))


TIMES = [(0.003, 0.001, 0.002), (0.001, 0.003, 0.002), (0.002, 0.002, 0.002), (0.0005, 0.001, 0.004)]


@pytest.mark.parametrize(("h", "p", "c"), TIMES)
def test_three_stage_pipeline(h: float, p: float, c: float) -> None:
    """A host that does not wait for the routing (`sync_routing=False`) and a deep stream: the layers
    flow through host, link and stream like jobs through a three-machine flow shop, whose makespan for
    N identical jobs is h + p + c + (N - 1) max(h, p, c)."""
    n = 8
    res = simulate(n, costs(p, c, HostCost(plan=ComputeCost(h), sync_routing=False)))
    assert res.makespan_s == pytest.approx(h + p + c + (n - 1) * max(h, p, c), rel=1e-12)
    assert res.steps[0].end - res.steps[0].start == pytest.approx(res.makespan_s, rel=1e-12)
    assert res.counters.misses == n
    assert res.metrics()["host_busy_frac"] == pytest.approx(n * h / res.makespan_s, rel=1e-12)


@pytest.mark.parametrize(("h", "p", "c"), TIMES)
def test_synchronous_device_serialises_the_stages(h: float, p: float, c: float) -> None:
    """queue_depth 0 (a synchronous device, the CPU): the host waits for every kernel, so nothing
    overlaps: N (h + p + c). Reading the routing back (a sync per layer) does the same on a deep stream."""
    n = 8
    for host in (HostCost(plan=ComputeCost(h), queue_depth=0, sync_routing=False),
                 HostCost(plan=ComputeCost(h), queue_depth=0), HostCost(plan=ComputeCost(h))):
        res = simulate(n, costs(p, c, host))
        assert res.makespan_s == pytest.approx(n * (h + p + c), rel=1e-12), host
        assert res.stall_s == pytest.approx(n * p, rel=1e-12)


@pytest.mark.parametrize(("a", "h", "p", "c", "d"), [(0.004, 0.001, 0.002, 0.001, 0.0005), (0.001, 0.001, 0.002, 0.003, 0.001)])
def test_launch_overlaps_the_previous_layer(a: float, h: float, p: float, c: float, d: float) -> None:
    """With the routing read back: the host launches layer i+1's dense part (a) while layer i's copy
    and expert run, the stream then runs it (d), the host syncs and plans (h). The first layer takes
    a + d + h, every later one max(a, p + c) + d + h, and the last copy and expert p + c."""
    n = 6
    res = simulate(n, costs(p, c, HostCost(layer=ComputeCost(a), plan=ComputeCost(h)), dense=d))
    want = a + d + h + (n - 1) * (max(a, p + c) + d + h) + p + c
    assert res.makespan_s == pytest.approx(want, rel=1e-12)


def test_bounded_queue_depth() -> None:
    """Each layer launches two kernels (its dense part, here of zero length, and its expert). With
    room for one unfinished kernel the host, launching layer i+1's dense part, waits for layer i's
    expert, before it has handed over layer i+1's copy: every stage serial, as with none. With room
    for two it hands the copy over while layer i computes: the deep stream's makespan."""
    n, h, p, c = 8, 0.0005, 0.001, 0.003

    def span(depth: int) -> float:
        return simulate(n, costs(p, c, HostCost(plan=ComputeCost(h), sync_routing=False, queue_depth=depth))).makespan_s

    assert span(10**6) == pytest.approx(h + p + c + (n - 1) * c, rel=1e-12)
    assert span(0) == pytest.approx(n * (h + p + c), rel=1e-12)
    assert span(1) == pytest.approx(n * (h + p + c), rel=1e-12)
    assert span(2) == pytest.approx(span(10**6), rel=1e-12)


def test_copy_cost_and_cpu_experts_are_host_work() -> None:
    """Per copy the host pays copy_s before the link may start it; a CPU expert is computed by the
    host itself (fiddler): on a synchronous device both add up with everything else."""
    n, s, p, c = 4, 0.0007, 0.002, 0.001
    res = simulate(n, costs(p, c, HostCost(copy_s=s, queue_depth=0)))
    assert res.makespan_s == pytest.approx(n * (s + p + c), rel=1e-12)


def test_zero_host_costs_equal_the_direct_stream() -> None:
    """Host costs all zero on a deep stream: the same times as a profile without a host (the compute
    stream driven directly), on two steps with hits and misses."""
    recs = [*one_step(4, 0, 0), *one_step(4, 1, 1), *one_step(4, 1, 2)]
    base = costs(0.002, 0.001, None, dense=0.0003)
    a = simulate(4, base, records=recs).metrics()
    b = simulate(4, dataclasses.replace(base, host=HostCost()), records=recs).metrics()
    for k, v in a.items():
        assert b[k] == (v if v is None else pytest.approx(v, rel=1e-12, abs=1e-15)), k
    assert {"host_busy_frac", "host_sync_wait_s", "launch_wait_s"} <= set(b)
    assert not {"host_busy_frac"} & set(a)


def test_host_lane_in_the_timeline() -> None:
    tl = Timeline(4, 0)
    simulate(3, costs(0.002, 0.001, HostCost(plan=ComputeCost(0.0005), layer=ComputeCost(0.0002), copy_s=0.0001)), timeline=tl)
    lanes = {iv.lane for iv in tl.intervals}
    assert lanes == {"host", "gpu", "h2d0"}
    host = [iv.label.split(" ")[0] for iv in tl.intervals if iv.lane == "host"]
    assert host.count("plan") == 3 and host.count("submit") == 3 and host.count("launch") == 3
    from sim.timeline import _lanes

    assert _lanes(tl)[0] == "host"


def test_context_from_the_steps() -> None:
    """Positions attended per call: a prompt of 5 rows attends to 1+2+..+5 = 15; then decode rows at
    contexts 5, 6, 7 attend to 6, 7, 8; a prefill after a decode step is a new prompt. With `seq_ids`
    every sequence has its own context (two sequences decoding together: 2 rows)."""
    from sim.context import with_keys

    def layer(step: int, phase: str, tokens: int) -> LayerRecord:
        return LayerRecord(step=step, phase=phase, layer=0, tokens=tokens, topk=[[0]] * tokens, weights=[[1.0]] * tokens)

    plain = [layer(0, "prefill", 5), layer(1, "decode", 1), layer(2, "decode", 1), layer(3, "decode", 1),
             layer(4, "prefill", 2), layer(5, "decode", 1)]
    assert [k for _, k in with_keys(plain)] == [15, 6, 7, 8, 3, 3]
    seqs = [layer(0, "prefill", 3), StepRecord(step=0, phase="prefill", seq_ids=[7]),
            layer(1, "prefill", 2), StepRecord(step=1, phase="prefill", seq_ids=[8]),
            layer(2, "decode", 2), StepRecord(step=2, phase="decode", seq_ids=[7, 8]),
            layer(3, "decode", 2), StepRecord(step=3, phase="decode", seq_ids=[7, 8])]
    assert [k for _, k in with_keys(seqs)] == [6, 3, 4 + 3, 5 + 4]


def test_decode_cost_grows_with_the_context() -> None:
    """dense_per_key_s: a decode step at context L costs its dense part plus per_key x (L + 1)."""
    n_layers, per_key = 2, 1e-6
    recs: list[LayerRecord | StepRecord] = [
        LayerRecord(step=0, phase="prefill", layer=i, tokens=4, topk=[[0]] * 4, weights=[[1.0]] * 4) for i in range(n_layers)
    ]
    for s in (1, 2, 3):
        recs += [LayerRecord(step=s, phase="decode", layer=i, tokens=1, topk=[[0]], weights=[[1.0]]) for i in range(n_layers)]
    for host in (None, HostCost(queue_depth=0)):
        cm = dataclasses.replace(costs(0.0, 0.0, host, dense=0.001), dense_per_key_s=per_key)
        res = simulate(n_layers, cm, records=recs)
        lat = [s.end - s.start for s in res.steps]
        assert lat[0] == pytest.approx(n_layers * (0.001 + per_key * 10), rel=1e-9)  # 1+2+3+4 positions
        for i, ctx in enumerate((4, 5, 6), start=1):
            assert lat[i] == pytest.approx(n_layers * (0.001 + per_key * (ctx + 1)), rel=1e-9)


def test_profile_host_block() -> None:
    """A profile's `host` block reaches the engine; without it the dump has no `host` key (so a
    replay's `--out` is as before) and the cost model no host."""
    from lab.hardware import HardwareProfile, load_profile

    base = load_profile("rtx4090").model_dump()
    base.pop("host", None)
    plain = HardwareProfile.model_validate(base)
    assert "host" not in plain.model_dump() and "calibration" not in plain.model_dump()
    assert plain.cost_model(model(2)).host is None
    with_host = HardwareProfile.model_validate({**base, "host": {"queue_depth": 0, "plan": {"points": [[1, 1e-4], [8, 2e-4]]},
                                                                  "plans": {"lru+fiddler": {"fixed_s": 3e-4}}, "copy_s": 5e-5}})
    hc = with_host.cost_model(model(2)).host
    assert hc is not None and hc.queue_depth == 0 and hc.copy_s == 5e-5
    assert hc.plan_for("lru")(1) == 1e-4 and hc.plan_for("lru")(8) == 2e-4
    assert hc.plan_for("lru+fiddler")(1) == 3e-4
    assert with_host.model_dump()["host"]["queue_depth"] == 0
    assert HardwareProfile.model_validate(with_host.model_dump()) == with_host
