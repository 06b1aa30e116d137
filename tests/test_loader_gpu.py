"""On a CUDA device: a checkpoint about twice the device memory the process may use runs offloaded,
within bf16 tolerance of a CPU reference, and allocates no more than its memory plan (dense + slots
+ reserve). Runs `bench/big_model_gpu.py` at a smaller size in a child process (the memory cap is
per process). Skipped without a GPU; the full-size figure comes from the bench itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_twice_the_device_cap_runs_offloaded(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "bench/big_model_gpu.py", "--hidden", "1024", "--layers", "12", "--cap-gib", "1.0",
                        "--min-ratio", "2.0", "--dir", str(tmp_path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all(res["checks"].values()), res["checks"]
    assert res["bytes_per_miss"] == res["expert_bytes"] == 3 * 1024 * 3584 * 2
    assert res["peak_device_allocated_bytes"] <= res["cap_bytes"]
