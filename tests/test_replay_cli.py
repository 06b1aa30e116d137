"""The command lines the README and the docs show, run as a user runs them (subprocess), on the shipped
Mixtral trace: exit status, the summary, the `--out` JSON (DESIGN section 5), the timeline, and the
trace tools `traces.schema` and `traces.stats`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cache import CacheConfig
from lab.hardware import load_profile
from traces.io import read_header

ROOT = Path(__file__).resolve().parent.parent
TRACE = "traces/mixtral-8x7b-gsm8k.jsonl.gz"  # relative to ROOT, as the README gives it
HARDWARE = "a100-pcie"

# DESIGN section 5: every metric, plus hit_rate
DESIGN_METRICS = [
    "accesses", "hits", "inflight_hits", "misses", "bytes_h2d", "prefetches", "wasted_prefetches", "stall_s",
    "ttft_s", "tpot_s", "link_busy_frac", "dropped_mass", "substituted_mass", "hit_rate",
]


def run(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{module} exited {proc.returncode}: {proc.stderr}"
    return proc


def replay_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run("sim.replay", TRACE, "--hardware", HARDWARE, "--no-progress", *args)


@pytest.fixture(scope="module")
def lru_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    d = tmp_path_factory.mktemp("replay")
    out, html = d / "lru.json", d / "lru.html"
    proc = replay_cli("--policy", "lru", "--cache-per-layer", "4", "--out", out, "--timeline", html)
    return proc, out, html


def test_replay_exits_0_with_a_summary(lru_run) -> None:  # type: ignore[no-untyped-def]
    proc, _, _ = lru_run
    assert "hit rate" in proc.stdout
    assert any(line.split() == ["policy", "lru"] for line in proc.stdout.splitlines()), proc.stdout
    assert proc.stderr == ""  # 128 slots fit an A100's 80 GiB: no note


def test_out_is_byte_identical_for_identical_inputs(lru_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, first, _ = lru_run
    again = tmp_path / "again.json"
    replay_cli("--policy", "lru", "--cache-per-layer", "4", "--out", again, "--timeline", tmp_path / "again.html")
    assert again.read_bytes() == first.read_bytes()
    other = tmp_path / "fifo.json"
    proc = replay_cli("--policy", "fifo", "--cache-per-layer", "4", "--out", other)
    assert any(line.split() == ["policy", "fifo"] for line in proc.stdout.splitlines())
    assert other.read_bytes() != first.read_bytes()
    assert json.loads(other.read_text())["config"]["policy"] == "fifo"


def test_out_json_config_and_metrics(lru_run) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = lru_run
    doc = json.loads(out.read_text())
    assert set(doc) == {"config", "metrics"}
    config, m = doc["config"], doc["metrics"]

    assert config["trace"]["path"] == TRACE
    assert config["trace"]["sha256"] == hashlib.sha256((ROOT / TRACE).read_bytes()).hexdigest()
    assert config["trace"]["truncated"] is False
    assert config["policy"] == "lru"
    model = read_header(ROOT / TRACE).model
    assert config["model"] == json.loads(model.model_dump_json())
    assert config["cache"] == {
        "request": {"per_layer": 4},
        "slots": 4 * model.num_moe_layers,
        "partition": "per_layer",
        "bytes": 4 * model.num_moe_layers * model.expert_bytes,
    }
    assert config["hardware"] == json.loads(load_profile(HARDWARE).model_dump_json())

    missing = [k for k in DESIGN_METRICS if k not in m]
    assert not missing, missing
    assert m["accesses"] > 0
    assert m["hit_rate"] == (m["hits"] + m["inflight_hits"]) / m["accesses"]
    assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"]
    assert m["bytes_h2d"] == m["misses"] * model.expert_bytes
    assert m["ttft_s"] is None  # the shipped traces have no prefill
    assert m["tpot_s"] > 0 and 0 < m["link_busy_frac"] <= 1
    assert m["dropped_mass"] == m["substituted_mass"] == 0.0


def test_timeline_html_has_a_lane_per_stream(lru_run) -> None:  # type: ignore[no-untyped-def]
    _, _, html = lru_run
    text = html.read_text(encoding="utf-8")
    is_html = "<html" in text[:200].lower() and text.rstrip().endswith("</html>")
    assert is_html
    assert "plotly" in text
    assert '"gpu"' in text and '"h2d0"' in text


def test_partitioned_cache_experts_equals_cache_per_layer(tmp_path: Path) -> None:
    model = read_header(ROOT / TRACE).model
    assert model.num_moe_layers == 32
    split = CacheConfig(experts=64, partition="per_layer").build(model)
    assert split.part_capacity == [2] * 32

    a, b = tmp_path / "experts64.json", tmp_path / "per_layer2.json"
    replay_cli("--cache-experts", "64", "--partition", "per_layer", "--out", a)
    replay_cli("--cache-per-layer", "2", "--out", b)
    ca, cb = json.loads(a.read_text()), json.loads(b.read_text())
    assert (ca["config"]["cache"]["slots"], ca["config"]["cache"]["partition"]) == (64, "per_layer")
    assert ca["metrics"]["hits"] == cb["metrics"]["hits"]
    assert ca["metrics"] == cb["metrics"]  # the same cache: the same simulation


def test_schema_prints_json_schema() -> None:
    schema = json.loads(run("traces.schema").stdout)
    assert {"Header", "LayerRecord", "StepRecord", "Footer"} <= set(schema["$defs"])


def test_stats_json_counts_the_layer_records() -> None:
    stats = json.loads(run("traces.stats", TRACE, "--json").stdout)
    assert stats["layer_records"] == 7889
    assert stats["steps"]["total"] == 247
