"""Hardware presets and the cost model derived from them (lab/hardware.py)."""

from __future__ import annotations

import json

import pytest

from lab.hardware import GB, PROFILE_DIR, Cost, Fit, HardwareError, HardwareProfile, load_profile, presets
from policies.costs import ComputeCost
from traces.models import model_preset

PRESETS = presets()
MIXTRAL = model_preset("mixtral-8x7b")
TOKENS = [1, 2, 3, 4, 8, 16, 32, 64, 100, 128, 256, 512, 1000, 1024, 2048, 4096, 8192, 16384, 65536]


def test_six_presets_ship() -> None:
    assert PRESETS == sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
    assert len(PRESETS) == 6


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_is_datasheet_derived(name: str) -> None:
    prof = load_profile(name)
    assert prof.name == name
    assert prof.source == "datasheet"
    assert prof.fit is None
    assert prof.references and all(r.strip() for r in prof.references)
    assert prof.description
    # loading by path gives the same profile as loading by name
    assert load_profile(str(PROFILE_DIR / f"{name}.json")) == prof


@pytest.mark.parametrize("name", PRESETS)
def test_preset_link_is_80_percent_of_the_interface(name: str) -> None:
    link = load_profile(name).link
    assert link.theoretical_gbps is not None
    assert link.h2d_gbps == pytest.approx(0.8 * link.theoretical_gbps, rel=1e-9)
    assert link.h2d_gbps <= link.theoretical_gbps


@pytest.mark.parametrize("name", PRESETS)
def test_transfer_time_is_latency_plus_bytes_over_bandwidth(name: str) -> None:
    prof = load_profile(name)
    assert prof.link.copy_engines == 1  # one engine: a transfer has the whole link
    costs = prof.cost_model(MIXTRAL)
    expected = prof.link.latency_us * 1e-6 + MIXTRAL.expert_bytes / (prof.link.h2d_gbps * GB)
    assert costs.transfer_s() == pytest.approx(expected, rel=1e-12)
    assert costs.transfer_s("full") == costs.transfer_s()


def test_transfer_time_of_one_mixtral_expert_on_rtx4090() -> None:
    """A hand-computed figure: 3 x 4096 x 14336 bf16 weights over 25.2 GB/s plus 10 us."""
    assert MIXTRAL.expert_bytes == 3 * 4096 * 14336 * 2
    costs = load_profile("rtx4090").cost_model(MIXTRAL)
    assert costs.transfer_s() == pytest.approx(10e-6 + 352_321_536 / 25.2e9, rel=1e-12)
    assert costs.transfer_s() == pytest.approx(0.013991, abs=1e-6)


def test_transfer_time_per_variant() -> None:
    prof = load_profile("rtx4090")
    half = MIXTRAL.expert_bytes // 4
    costs = prof.cost_model(MIXTRAL, {"full": MIXTRAL.expert_bytes, "low": half})
    assert costs.transfer_s("low") == pytest.approx(prof.link.latency_us * 1e-6 + half / (prof.link.h2d_gbps * GB))
    assert costs.transfer_s("low") < costs.transfer_s("full")


@pytest.mark.parametrize("name", PRESETS)
def test_gpu_expert_for_one_token_is_memory_bound(name: str) -> None:
    prof = load_profile(name)
    g = prof.gpu
    costs = prof.cost_model(MIXTRAL)
    read_weights = MIXTRAL.expert_bytes / (g.hbm_gbps * GB * g.hbm_efficiency)
    compute = 6.0 * MIXTRAL.hidden_size * MIXTRAL.moe_intermediate_size / (g.peak_tflops * 1e12 * g.flops_efficiency)
    assert compute < read_weights  # one token: reading the weights dominates
    assert costs.gpu_expert_s(1) == pytest.approx(g.expert_overhead_us * 1e-6 + read_weights, rel=1e-12)


@pytest.mark.parametrize("name", PRESETS)
def test_cpu_expert_for_one_token_is_memory_bound(name: str) -> None:
    prof = load_profile(name)
    c = prof.cpu
    costs = prof.cost_model(MIXTRAL)
    read_weights = MIXTRAL.expert_bytes / (c.mem_gbps * GB * c.mem_efficiency)
    assert costs.cpu_expert_s(1) == pytest.approx(c.expert_overhead_us * 1e-6 + read_weights, rel=1e-12)


@pytest.mark.parametrize("name", PRESETS)
def test_gpu_expert_is_compute_bound_for_large_batches(name: str) -> None:
    prof = load_profile(name)
    g = prof.gpu
    costs = prof.cost_model(MIXTRAL)
    n = 65536
    compute = n * 6.0 * MIXTRAL.hidden_size * MIXTRAL.moe_intermediate_size / (g.peak_tflops * 1e12 * g.flops_efficiency)
    assert costs.gpu_expert_s(n) == pytest.approx(g.expert_overhead_us * 1e-6 + compute, rel=1e-12)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("model", ["mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b", "gpt-oss-20b"])
def test_costs_are_non_decreasing_in_tokens(name: str, model: str) -> None:
    costs = load_profile(name).cost_model(model_preset(model))
    for fn in (costs.gpu_expert_s, costs.cpu_expert_s, costs.dense_s):
        times = [fn(n) for n in TOKENS]
        assert all(t > 0 for t in times)
        assert all(a <= b for a, b in zip(times, times[1:], strict=False)), times
        assert fn(0) == 0.0


def _calibrated(model: str) -> HardwareProfile:
    data = json.loads((PROFILE_DIR / "rtx4090.json").read_text())
    data["name"] = "rtx4090-measured"
    data["source"] = "calibrated"
    data["fit"] = {
        "model": model,
        "dense": {"fixed_s": 3e-5, "per_token_s": 2e-7, "floor_s": 1e-4},
        "gpu_expert": {"fixed_s": 1.5e-5, "per_token_s": 4e-6, "floor_s": 4.5e-4},
        "cpu_expert": {"fixed_s": 6e-5, "per_token_s": 5e-4, "floor_s": 0.0},
    }
    return HardwareProfile.model_validate(data)


def test_calibrated_fit_replaces_the_roofline() -> None:
    prof = _calibrated("mixtral-8x7b")
    costs = prof.cost_model(MIXTRAL)
    assert costs.dense == ComputeCost(3e-5, 2e-7, 1e-4)
    assert costs.gpu_expert == ComputeCost(1.5e-5, 4e-6, 4.5e-4)
    assert costs.cpu_expert == ComputeCost(6e-5, 5e-4, 0.0)
    for n in TOKENS:
        assert costs.gpu_expert_s(n) == pytest.approx(1.5e-5 + max(4.5e-4, 4e-6 * n), rel=1e-12)
        assert costs.cpu_expert_s(n) == pytest.approx(6e-5 + 5e-4 * n, rel=1e-12)
        assert costs.dense_s(n) == pytest.approx(3e-5 + max(1e-4, 2e-7 * n), rel=1e-12)
    # the link still comes from the profile's link section
    roofline = load_profile("rtx4090").cost_model(MIXTRAL)
    assert costs.transfer_s() == roofline.transfer_s()
    assert costs.gpu_expert_s(1) != roofline.gpu_expert_s(1)


def test_calibrated_profile_loads_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    prof = _calibrated("mixtral-8x7b")
    f = tmp_path / "measured.json"
    f.write_text(prof.model_dump_json(indent=2))
    loaded = load_profile(str(f))
    assert loaded == prof
    assert isinstance(loaded.fit, Fit) and loaded.fit.gpu_expert == Cost(fixed_s=1.5e-5, per_token_s=4e-6, floor_s=4.5e-4)


def test_calibrated_fit_for_another_model_is_refused() -> None:
    prof = _calibrated("other-model")
    with pytest.raises(HardwareError, match="other-model"):
        prof.cost_model(MIXTRAL)


def test_expert_budget_subtracts_dense_weights_and_reserve() -> None:
    prof = load_profile("rtx4090")
    budget = prof.expert_budget_bytes(MIXTRAL)
    assert budget == int(24 * 2**30 - prof.gpu.reserve_gib * 2**30 - MIXTRAL.dense_bytes)
    assert 0 < budget // MIXTRAL.expert_bytes < MIXTRAL.num_experts * MIXTRAL.num_moe_layers
