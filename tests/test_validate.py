"""Calibration, measured-vs-predicted validation and the quality report of the runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from lab.hardware import HardwareProfile  # noqa: E402
from runtime.calibrate import calibrate  # noqa: E402
from runtime.run import run  # noqa: E402
from runtime.validate import validate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINK = "emulated:2GB/s,20us"


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prof = calibrate("tiny-mixtral", LINK, repeats=1)
    path = tmp_path_factory.mktemp("cal") / "profile.json"
    path.write_text(json.dumps(prof))
    return path


def test_calibrated_profile_is_a_hardware_profile(profile: Path) -> None:
    p = HardwareProfile.model_validate_json(profile.read_text())
    assert p.source == "calibrated" and p.fit is not None and p.fit.model == "tiny-mixtral"
    # the emulated link holds copies to 2 GB/s; what the fit finds is a timing (a busy machine slows it), not asserted
    assert p.link.h2d_gbps > 0 and p.link.theoretical_gbps == 2.0
    assert p.fit.dense.fixed_s > 0 and p.fit.gpu_expert.fixed_s + p.fit.gpu_expert.per_token_s > 0
    r = subprocess.run([sys.executable, "-m", "sim.replay", "traces/mixtral-8x7b-gsm8k.jsonl.gz", "--cache-per-layer", "2",
                        "--hardware", str(profile), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "calibrated on model 'tiny-mixtral'" in r.stderr  # another model: refused


@pytest.mark.parametrize("policy", ["lru", "lfu(decay=0.9)", "fifo", "random(seed=1)", "belady"])
def test_validation_counts_are_equal(tmp_path: Path, profile: Path, policy: str) -> None:
    res = validate("tiny-mixtral", policy, cache_per_layer=3, link=LINK, profile=str(profile),
                   prompts=["one prompt", "and another one"], max_new_tokens=6, out_dir=tmp_path)
    assert res["counts_equal"], res["rows"]
    rows = {r["metric"]: r for r in res["rows"]}
    assert rows["misses"]["measured"] > 0 and rows["tpot_s"]["predicted"] > 0
    assert (tmp_path / "validation.json").exists() and (tmp_path / "run.jsonl.gz").exists()


def test_calibration_with_the_policy_under_test() -> None:
    """A policy that reads signals is calibrated running itself (its look-ahead routing is part of the
    measured per-layer time); one that weighs costs starts without a profile; an oracle runs as lru."""
    for policy, ran in (("lru+lookahead(depth=1,budget=2)", "lru+lookahead(depth=1,budget=2)"),
                        ("lru+fiddler", "lru+fiddler"), ("belady", "lru")):
        prof = calibrate("tiny-mixtral", LINK, repeats=1, policy=policy)
        assert prof["description"].endswith(f"policy {ran}")
        assert HardwareProfile.model_validate(prof).fit is not None
    r = subprocess.run([sys.executable, "-m", "runtime.calibrate", "--model", "tiny-mixtral", "--policy", "nope", "-o", "x.json"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def test_lossless_quality_is_the_exact_models() -> None:
    m = run("tiny-qwen2-moe", "lru", cache_per_layer=2, link=LINK, max_new_tokens=4)
    assert m["kl_divergence"] == 0.0 and m["token_agreement"] == 1.0
    assert m["perplexity"] == m["perplexity_exact"] > 1.0


def test_validate_cli(tmp_path: Path, profile: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "runtime.validate", "--model", "tiny-olmoe", "--policy", "lru", "--cache-per-layer", "5",
         "--link", LINK, "--profile", str(profile), "--max-new-tokens", "3", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    # the profile was calibrated on tiny-mixtral: validating tiny-olmoe against it is refused in one line
    assert r.returncode == 2 and "calibrated on model" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run(
        [sys.executable, "-m", "runtime.validate", "--model", "tiny-mixtral", "--policy", "lru", "--cache-per-layer", "2",
         "--link", LINK, "--profile", str(profile), "--max-new-tokens", "3", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "| misses |" in r.stdout and "equal" in r.stdout and "| tpot_s |" in r.stdout


@pytest.mark.gpu
def test_cuda_calibration_and_validation(tmp_path: Path) -> None:
    """On a CUDA card: calibrate with the real copy stream, then validate: counts equal, and the
    calibrated link is a plausible PCIe/NVLink rate."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    prof = calibrate("tiny-mixtral", "cuda", device="cuda", repeats=2)
    p = HardwareProfile.model_validate(prof)
    assert 0.5 < p.link.h2d_gbps < 1000
    res = validate("tiny-mixtral", "lru", cache_per_layer=3, link="cuda", profile=p, prompts=["one prompt", "another"],
                   max_new_tokens=8, out_dir=tmp_path, device="cuda")
    assert res["counts_equal"], res["rows"]
