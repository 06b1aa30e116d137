"""The runtime sizes its cache with `lab.cache.CacheConfig`, as the simulator does: `--cache-gb` means
the same slots in both, and a size no cache can hold is refused with the same words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from lab.cache import GIB, CacheConfig  # noqa: E402
from runtime.models import load_model  # noqa: E402
from runtime.offload import OffloadError, OffloadSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_cache_gb_means_the_simulators_slots() -> None:
    model, name = load_model("tiny-mixtral")
    probe = OffloadSession(model, "lru", cache_per_layer=2, name=name)
    spec = probe.spec
    gb = 5.5 * spec.expert_bytes / GIB  # room for 5 experts
    session = OffloadSession(model, "lru", cache_gb=gb, name=name)
    assert session.cache.capacity == CacheConfig(gb=gb).slots(spec) == 5
    assert session.cache.partition == "global"
    per = OffloadSession(model, "lru", cache=CacheConfig(gb=gb * spec.num_moe_layers, partition="per_layer"), name=name)
    assert per.cache.partition == "per_layer" and per.cache.capacity == CacheConfig(gb=gb * spec.num_moe_layers).slots(spec)
    for kw, words in (({}, "give exactly one cache size"), ({"cache_experts": 2, "cache_gb": 1.0}, "give exactly one cache size"),
                      ({"cache_gb": 1e-9}, "holds no"), ({"cache_gb": spec.expert_bytes / GIB}, "cache too small")):
        with pytest.raises(OffloadError, match=words):
            OffloadSession(model, "lru", name=name, **kw)


def test_runtime_cli_takes_cache_gb(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--model", "tiny-mixtral", "--cache-gb", "1e-9", "--max-new-tokens", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "holds no" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--model", "tiny-mixtral", "--cache-gb", "1", "--cache-experts", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "give exactly one of --cache-experts N, --cache-per-layer K and --cache-gb X" in r.stderr
