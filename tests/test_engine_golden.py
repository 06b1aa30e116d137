"""A profile without host costs replays exactly as before the host timeline existed: the metrics and
the Chrome trace of a matrix of replays (shipped traces x policies x cache sizes x profiles) equal,
float for float and byte for byte, what the engine gave before (`tests/golden/replay-baseline.json`,
captured from the engine as it was at commit b28180a, before the host timeline; never regenerate it
to make this test pass: a difference is a change of the simulator's results)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sim.config import CacheConfig
from sim.engine import Timeline
from sim.hardware import HardwareProfile, load_profile
from sim.replay import replay
from sim.timeline import chrome_trace

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "replay-baseline.json"
CALIBRATED = ROOT / "docs" / "validation" / "h100" / "profile-tiny-mixtral.json"

TRACES = {
    "gsm8k": "traces/mixtral-8x7b-gsm8k.jsonl.gz",
    "coarse": "traces/zoo-coarse.jsonl.gz",
    "fine": "traces/zoo-fine.jsonl.gz",
}
# (trace, policy, cache, hardware, timeline?)
CASES: list[tuple[str, str, dict[str, Any], str, bool]] = [
    ("gsm8k", "lru", {"per_layer": 4}, "rtx4090", True),
    ("gsm8k", "lru", {"experts": 80}, "h100-pcie", False),
    ("gsm8k", "lfu", {"per_layer": 3}, "rtx4060-laptop", False),
    ("gsm8k", "belady", {"experts": 64}, "rtx4090", False),
    ("gsm8k", "lru+fiddler", {"per_layer": 3}, "rtx3090", True),
    ("gsm8k", "lru+lookahead", {"per_layer": 4}, "two-engines", True),
    ("gsm8k", "hobbit", {"per_layer": 4}, "rtx4090", False),
    ("gsm8k", "moe-infinity", {"experts": 96}, "a100-pcie", False),
    ("coarse", "lru", {"per_layer": 3}, "calibrated", True),
    ("coarse", "lru+lookahead", {"per_layer": 3}, "calibrated", True),
    ("coarse", "lru+fiddler", {"per_layer": 3}, "calibrated", True),
    ("coarse", "mobile", {"per_layer": 3}, "calibrated", False),
    ("coarse", "substitute", {"per_layer": 3}, "calibrated", False),
    ("coarse", "buddy", {"per_layer": 4}, "rtx4090", True),
    ("coarse", "mobile", {"per_layer": 2}, "two-engines", False),
    ("coarse", "substitute(similarity=weights)", {"per_layer": 2}, "rtx4090", False),
    ("fine", "lru", {"per_layer": 8}, "calibrated", True),
    ("fine", "lru+lookahead", {"per_layer": 6}, "two-engines", True),
    ("fine", "lru+fiddler", {"per_layer": 6}, "calibrated", False),
    ("fine", "lru+adaptive-k", {"experts": 40}, "h100-pcie", False),
]


def profile(name: str, model_name: str) -> HardwareProfile:
    """A preset; `two-engines`: rtx4060-laptop with two copy engines; `calibrated`: the H100
    calibration of tiny-mixtral (measured points, a step cost) relabelled for the trace's model."""
    if name == "two-engines":
        p = load_profile("rtx4060-laptop")
        return p.model_copy(update={"link": p.link.model_copy(update={"copy_engines": 2})})
    if name == "calibrated":
        data = json.loads(CALIBRATED.read_text())
        data.pop("host", None)
        data["fit"]["model"] = model_name
        for k in [k for k in data["fit"] if k not in ("model", "dense", "gpu_expert", "cpu_expert", "step")]:
            data["fit"].pop(k)
        return HardwareProfile.model_validate(data)
    p = load_profile(name)
    return p.model_copy(update={"host": None}) if "host" in type(p).model_fields else p


def run_case(case: tuple[str, str, dict[str, Any], str, bool]) -> dict[str, Any]:
    trace, policy, cache, hw, with_timeline = case
    path = ROOT / TRACES[trace]
    from traces.io import read_header

    prof = profile(hw, read_header(path).model.name)
    tl = Timeline(4, 2) if with_timeline else None
    res = replay(path, policy, CacheConfig(**cache), prof, timeline=tl)
    out: dict[str, Any] = {"metrics": res.metrics}
    if tl is not None:
        text = json.dumps(chrome_trace(tl, "golden"), separators=(",", ":"))
        out["chrome_trace_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return out


def case_id(case: tuple[str, str, dict[str, Any], str, bool]) -> str:
    trace, policy, cache, hw, _ = case
    return f"{trace}|{policy}|{json.dumps(cache, sort_keys=True)}|{hw}"


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hostless_profile_replays_exactly_as_before(case, golden) -> None:  # type: ignore[no-untyped-def]
    want = golden[case_id(case)]
    got = run_case(case)
    assert got["metrics"] == want["metrics"]
    assert got.get("chrome_trace_sha256") == want.get("chrome_trace_sha256")


if __name__ == "__main__":  # how the golden file was made (from the engine before the host timeline)
    if "--write-golden" not in sys.argv:
        sys.exit("usage: python tests/test_engine_golden.py --write-golden (only from the pre-host-timeline engine)")
    GOLDEN.write_text(json.dumps({case_id(c): run_case(c) for c in CASES}, indent=1, sort_keys=True) + "\n")


# the whole `--out` text (config and metrics) of two replays, trace paths as a user gives them from
# the repository root, before the host timeline existed
OUT_SHA256 = {
    ("traces/mixtral-8x7b-gsm8k.jsonl.gz", "lru", "rtx4090"): "b52232ed3f34efa7a46bfb5d52418f51dfcc0b418b23fc2e43f284a7fe5ac479",
    ("traces/zoo-coarse.jsonl.gz", "lru+fiddler", "calibrated"): "cdf59399fd523672ef129abc1074c50bf59d83700e0576f7f2908de721f08044",
}


@pytest.mark.parametrize("key", list(OUT_SHA256), ids=lambda k: "|".join(k))
def test_hostless_out_file_is_byte_identical(key, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trace, policy, hw = key
    from traces.io import read_header

    monkeypatch.chdir(ROOT)
    res = replay(trace, policy, CacheConfig(per_layer=4), profile(hw, read_header(trace).model.name))
    assert hashlib.sha256(res.to_json().encode()).hexdigest() == OUT_SHA256[key]
