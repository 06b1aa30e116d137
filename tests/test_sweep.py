"""`python -m sim.sweep`: the grid and its excludes, every validation error with its TOML line, results
equal to `sim.replay`, resume after SIGKILL with every point exactly once, error rows, CSV export and
the Ray backend."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.cache import CacheConfig
from policies import REGISTRY, DemandPolicy, register
from sim.replay import replay
from sim.sweep import (
    RESULTS_FILE,
    SweepError,
    canonical_json,
    config_hash,
    export,
    load_sweep,
    main,
    read_results,
    run_sweep,
)
from sim.tomlpos import key_lines
from traces.synthetic import iid_calls, toy_model, write_trace, zipf_probs

ROOT = Path(__file__).resolve().parent.parent
MODEL = toy_model(num_layers=2, num_experts=8, top_k=2)


def make_trace(path: Path, n_calls: int = 200, seed: int = 1, num_layers: int = 2) -> Path:
    model = toy_model(num_layers=num_layers, num_experts=8, top_k=2)
    write_trace(path, model, iid_calls(zipf_probs(8, 0.8), n_calls, num_layers=num_layers, top_k=2, seed=seed))
    return path


@pytest.fixture
def traces(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "traces"
    d.mkdir()
    return make_trace(d / "a.jsonl", seed=1), make_trace(d / "b.jsonl.gz", seed=2)


BASE = """\
description = "test grid"
traces = ["traces/a.jsonl", "traces/b.jsonl.gz"]
policies = ["lru", "lfu(decay=0.9)", "belady"]
hardware = ["rtx4090", "a100-pcie"]
cache = {per_layer = [2, 3], experts = [6], partition = ["global", "per_layer"]}
"""


def write_sweep(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- the grid ---------------------------------------------------------------------------------------
def test_grid_expansion(tmp_path: Path, traces: tuple[Path, Path]) -> None:
    sw = load_sweep(write_sweep(tmp_path, BASE))
    # 2 traces x 3 policies x 2 cards x (2 per-layer sizes + 1 experts size x 2 partitions)
    assert len(sw.points) == 2 * 3 * 2 * 4 and sw.excluded == 0
    assert len({p.config_hash for p in sw.points}) == len(sw.points)
    combos = {(p.columns["trace"], p.columns["policy"], p.columns["hardware"], p.columns["cache_kind"],
               p.columns["cache_size"], p.columns["partition"]) for p in sw.points}
    want = set(itertools.product(
        ["a.jsonl", "b.jsonl.gz"], ["lru", "lfu(decay=0.9)", "belady"], ["rtx4090", "a100-pcie"],
        [("per_layer", 2, "per_layer"), ("per_layer", 3, "per_layer"), ("experts", 6, "global"), ("experts", 6, "per_layer")],
    ))
    assert combos == {(t, p, h, *c) for t, p, h, c in want}
    # paths resolve against the sweep file, not the working directory
    assert {p.columns["trace_path"] for p in sw.points} == {str(t.resolve()) for t in traces}
    # columns: the cache in slots, per layer and GiB
    p = next(p for p in sw.points if p.columns["cache_kind"] == "per_layer" and p.columns["cache_size"] == 3)
    assert p.columns["cache_slots"] == 6 and p.columns["cache_per_layer"] == 3.0
    assert p.columns["cache_gib"] == pytest.approx(6 * 1_000_000 / 2**30)


def test_hash_is_sha256_of_the_canonical_config(tmp_path: Path, traces: tuple[Path, Path]) -> None:
    sw = load_sweep(write_sweep(tmp_path, BASE))
    again = load_sweep(write_sweep(tmp_path, BASE.replace('"lfu(decay=0.9)"', '"lfu( decay = 0.90 )"'), "t.toml"))
    assert [p.config_hash for p in sw.points] == [p.config_hash for p in again.points]  # canonical spec
    p = sw.points[0]
    from lab.hardware import load_profile
    from sim.replay import TOOL

    cfg = {
        "tool": TOOL, "trace_sha256": p.columns["trace_sha256"], "policy": p.columns["policy"], "policy_files": {},
        "cache": {"per_layer": p.columns["cache_size"], "partition": "per_layer"},
        "hardware": load_profile(p.columns["hardware_ref"]).model_dump(mode="json"),
    }
    assert p.config_hash == config_hash(cfg) and json.loads(canonical_json(cfg)) == cfg
    # the trace's content is in the hash: a different trace at the same path is a different point
    make_trace(traces[0], seed=9)
    changed = load_sweep(write_sweep(tmp_path, BASE))
    assert changed.points[0].config_hash != p.config_hash
    assert changed.points[-1].config_hash == sw.points[-1].config_hash  # b.jsonl.gz is untouched


def test_excludes(tmp_path: Path, traces: tuple[Path, Path]) -> None:
    text = BASE + """
[[exclude]]
policy = "belady"
hardware = "a100-pcie"

[[exclude]]
trace = "traces/b.jsonl.gz"
per_layer = [2, 3]

[[exclude]]
policy = ["lfu(decay=0.90)"]
experts = 6
partition = "per_layer"
"""
    sw = load_sweep(write_sweep(tmp_path, text))
    cols = [p.columns for p in sw.points]
    assert not [c for c in cols if c["policy"] == "belady" and c["hardware"] == "a100-pcie"]
    assert not [c for c in cols if c["trace"] == "b.jsonl.gz" and c["cache_kind"] == "per_layer"]
    assert not [c for c in cols if c["policy"].startswith("lfu") and c["cache_kind"] == "experts" and c["partition"] == "per_layer"]
    # counted: rule 1 drops 2 traces x 4 sizes; rule 2 drops 3 policies x 2 cards x 2 sizes; rule 3 drops
    # 2 traces x 2 cards; overlaps: belady/a100/b/per_layer (2 points)
    dropped = 8 + 12 + 4 - 2
    assert sw.excluded == dropped and len(sw.points) == 48 - dropped
    # a rule matching every point empties the grid: an error, with the line of `exclude`
    with pytest.raises(SweepError, match=r"s2.toml:7: exclude: the grid is empty"):
        load_sweep(write_sweep(tmp_path, BASE + '\n[[exclude]]\nhardware = ["rtx4090", "a100-pcie"]\n', "s2.toml"))


# -- validation: one line, the file and the line of the key ------------------------------------------
HEAD = 'traces = ["traces/a.jsonl"]\npolicies = ["lru"]\nhardware = ["rtx4090"]\ncache = {per_layer = [2]}\n'

CASES = [
    # id, sweep text, line, fragments of the message
    ("unknown key", HEAD + "polices = ['lru']\n", 5, ["unknown key 'polices'", "known: description, traces, policies"]),
    ("unknown cache key", HEAD.replace("{per_layer", "{per_layr"), 4, ["cache.per_layr", "unknown key 'per_layr'"]),
    ("unknown exclude key", HEAD + "\n[[exclude]]\npolcy = 'lru'\n", 7, ["exclude[0].polcy", "unknown key"]),
    ("empty traces", HEAD.replace('["traces/a.jsonl"]', "[]"), 1, ["traces", "empty"]),
    ("empty policies", HEAD.replace('["lru"]', "[]"), 2, ["policies", "empty"]),
    ("empty cache", HEAD.replace("{per_layer = [2]}", "{per_layer = []}"), 4, ["cache", "empty"]),
    ("unknown policy", HEAD.replace('["lru"]', '[\n  "lru",\n  "lruu",\n]'), 4, ["policies[1]", "unknown policy 'lruu'", "known:"]),
    ("bad policy parameter", HEAD.replace('["lru"]', '["lru", "lfu(decay=2)"]'), 2, ["policies[1]", "decay"]),
    ("policy twice", HEAD.replace('["lru"]', '["lfu", "lfu(decay=1.0)"]'), 2, ["policies[1]", "same policy"]),
    ("unknown hardware", HEAD.replace('["rtx4090"]', '["rtx4090", "rtx9999"]'), 3, ["hardware[1]", "unknown hardware 'rtx9999'", "presets"]),
    ("missing profile file", HEAD.replace('["rtx4090"]', '["mine.json"]'), 3, ["hardware[0]", "mine.json", "no such"]),
    ("missing trace", HEAD.replace("traces/a.jsonl", "traces/nope.jsonl"), 1, ["traces[0]", "nope.jsonl", "no such file"]),
    ("cache below top_k", HEAD.replace("[2]", "[2, 1]"), 4, ["cache.per_layer[1]", "cache too small", "top_k=2"]),
    ("cache of no expert", HEAD.replace("{per_layer = [2]}", "{gb = [0.0001]}"), 4, ["cache.gb[0]", "holds no"]),
    ("wrong type", HEAD.replace("[2]", '[2, "x"]'), 4, ["cache.per_layer[1]", "valid integer"]),
    ("exclude value not in grid", HEAD + "\n[[exclude]]\nhardware = 'a100-pcie'\n", 7, ["exclude[0].hardware", "not one of"]),
    ("empty exclude rule", HEAD + "\n[[exclude]]\n", 6, ["exclude[0]", "at least one of"]),
    ("bad toml", HEAD + "cache2 = {per_layer = [2]\n", 5, ["invalid TOML"]),
    ("missing key", 'traces = ["traces/a.jsonl"]\npolicies = ["lru"]\ncache = {per_layer = [2]}\n', None, ["missing key 'hardware'"]),
]


@pytest.mark.parametrize("text, line, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_errors(tmp_path: Path, traces, capsys, text: str, line: int | None, fragments: list[str]) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, text)
    out = tmp_path / "out"
    assert main([str(s), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith("sim.sweep: error: ")
    assert (f"s.toml:{line}: " if line else "s.toml: ") in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert not out.exists()  # refused before anything ran


def test_invalid_trace_is_refused_with_its_line(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    lines = traces[0].read_text().splitlines()
    lines[5] = lines[5].replace('"layer":', '"layr":')
    traces[0].write_text("\n".join(lines) + "\n")
    with pytest.raises(SweepError, match=r"s.toml:1: traces\[0\]: .*a.jsonl:6: "):
        load_sweep(write_sweep(tmp_path, HEAD))


def test_cli_error_is_one_line_without_traceback(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, HEAD.replace('["rtx4090"]', '["rtx9999"]'))
    r = subprocess.run([sys.executable, "-m", "sim.sweep", str(s), "-o", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "s.toml:3: hardware[0]: unknown hardware" in r.stderr, r.stderr


def test_toml_positions() -> None:
    text = (
        '# a comment with [brackets] and key = "value"\n'
        'description = "has # and [ and = inside"\n'
        'policies = [\n  "lru",  # first\n  "lfu(decay=0.9)", "x]"\n]\n'
        "cache = { per_layer = [2, 3], 'partition' = \"global\" }\n"
        '[[exclude]]\npolicy = "lru"\n\n[[exclude]]\nexperts = 4\n[cache2]\nsub.key = 1\n'
    )
    pos = key_lines(text)
    assert pos[("description",)] == 2
    assert (pos[("policies",)], pos[("policies", 0)], pos[("policies", 1)], pos[("policies", 2)]) == (3, 4, 5, 5)
    assert pos[("cache", "per_layer", 1)] == 7 and pos[("cache", "partition")] == 7
    assert pos[("exclude", 0, "policy")] == 9 and pos[("exclude", 1)] == 11 and pos[("exclude", 1, "experts")] == 12
    assert pos[("cache2", "sub", "key")] == 14


# -- running ----------------------------------------------------------------------------------------
def _metric_keys(row: dict) -> dict:
    from sim.sweep import Point  # noqa: F401  (the row layout: config columns, then the metrics)

    return {k: v for k, v in row.items() if k not in ("wall_s",)}


def test_results_equal_replay(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    sw = load_sweep(write_sweep(tmp_path, BASE))
    summary = run_sweep(sw, tmp_path / "r1", jobs=1)
    assert summary.ran == len(sw.points) and not summary.errors
    rows = {r["config_hash"]: r for r in read_results(tmp_path / "r1")}
    assert set(rows) == {p.config_hash for p in sw.points}
    for p in sw.points:
        c = p.columns
        cache = CacheConfig(**({"per_layer": c["cache_size"]} if c["cache_kind"] == "per_layer"
                               else {c["cache_kind"]: c["cache_size"], "partition": c["partition"]}))
        res = replay(c["trace_path"], c["policy"], cache, c["hardware_ref"])
        row = rows[p.config_hash]
        assert {k: row[k] for k in res.metrics} == res.metrics, c
        assert res.config["cache"]["slots"] == c["cache_slots"] and res.config["policy"] == c["policy"]
        assert row["status"] == "ok" and row["trace_sha256"] == res.config["trace"]["sha256"]
    # the process pool, and the plain replay() path, give the very same rows
    run_sweep(sw, tmp_path / "r2", jobs=2)
    run_sweep(sw, tmp_path / "r3", jobs=2, reuse_traces=False)
    for other in ("r2", "r3"):
        got = {r["config_hash"]: _metric_keys(r) for r in read_results(tmp_path / other)}
        assert got == {h: _metric_keys(r) for h, r in rows.items()}


def test_trace_parsed_once_per_worker(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    sw = load_sweep(write_sweep(tmp_path, BASE))
    s = run_sweep(sw, tmp_path / "r", jobs=2)
    assert s.ran == 48 and 2 <= s.parses <= 2 * 2  # each of 2 traces at most once in each of 2 workers
    s = run_sweep(sw, tmp_path / "r0", jobs=2, reuse_traces=False)
    assert s.parses == 48


def test_rerun_skips_finished_points(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    sw = load_sweep(write_sweep(tmp_path, BASE))
    small = load_sweep(write_sweep(tmp_path, BASE.replace('"lfu(decay=0.9)", "belady"', '"belady"'), "small.toml"))
    assert run_sweep(small, tmp_path / "r", jobs=1).ran == 32
    s = run_sweep(sw, tmp_path / "r", jobs=1)
    assert (s.skipped, s.ran) == (32, 16)
    s = run_sweep(sw, tmp_path / "r", jobs=1)
    assert (s.skipped, s.ran) == (48, 0)
    assert len((tmp_path / "r" / RESULTS_FILE).read_text().splitlines()) == 48


def test_resume_after_sigkill_runs_every_point_exactly_once(tmp_path: Path) -> None:
    d = tmp_path / "traces"
    d.mkdir()
    make_trace(d / "a.jsonl", n_calls=6000, num_layers=4)
    s = write_sweep(tmp_path, """\
traces = ["traces/a.jsonl"]
policies = ["lru", "lfu", "fifo", "random(seed=0)", "random(seed=1)", "belady"]
hardware = ["rtx4090", "a100-pcie"]
cache = {per_layer = [2, 3, 4, 5, 6]}
""")
    n = 6 * 2 * 5
    out = tmp_path / "out"
    results = out / RESULTS_FILE
    cmd = [sys.executable, "-m", "sim.sweep", str(s), "-o", str(out), "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if results.exists() and results.read_bytes().count(b"\n") >= 4:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as an OOM killer or a power cut would
    finally:
        proc.wait(timeout=30)
    done = results.read_bytes().count(b"\n")
    assert 4 <= done < n, "the sweep finished before it could be killed: make its points slower"
    with open(results, "ab") as fh:  # a row half written when the kill came
        fh.write(b'{"config_hash": "0123456789abcdef", "status": "o')
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dropped a torn last line" in r.stderr
    assert f"{n - done} run, {done} already done" in r.stderr, r.stderr
    lines = results.read_text().splitlines()
    hashes = [json.loads(x)["config_hash"] for x in lines]
    assert len(lines) == n and len(set(hashes)) == n
    assert set(hashes) == {p.config_hash for p in load_sweep(s).points}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"0 run, {n} already done" in r.stderr
    assert len(results.read_text().splitlines()) == n


def test_sigterm_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    d = tmp_path / "traces"
    d.mkdir()
    make_trace(d / "a.jsonl", n_calls=6000, num_layers=4)
    s = write_sweep(tmp_path, 'traces = ["traces/a.jsonl"]\npolicies = ["lru", "lfu", "fifo", "belady"]\n'
                              'hardware = ["rtx4090", "a100-pcie"]\ncache = {per_layer = [2, 3, 4, 5, 6]}\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sim.sweep", str(s), "-o", str(out), "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / RESULTS_FILE).exists() and (out / RESULTS_FILE).read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # the driver only: it must shut its workers down itself
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hashes = [json.loads(x)["config_hash"] for x in (out / RESULTS_FILE).read_text().splitlines()]
    assert len(hashes) == len(set(hashes)) == 40


@pytest.fixture
def exploding_policy():  # type: ignore[no-untyped-def]
    @register("explode-test")
    class Explode(DemandPolicy):
        """Raises at the 5th layer call."""

        def plan(self, req, cache):  # type: ignore[no-untyped-def]
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 5:
                raise RuntimeError("boom\nat call 5")
            return super().plan(req, cache)

        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            return next((k for k in cache.least_recent(part) if k not in exclude and k not in cache.inflight), None)

    yield "explode-test"
    del REGISTRY["explode-test"]


def test_failing_points_become_error_rows(tmp_path: Path, traces, exploding_policy, capsys) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, HEAD.replace('["lru"]', f'["lru", "{exploding_policy}"]'))
    out = tmp_path / "out"
    assert main([str(s), "-o", str(out), "--jobs", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 run, 0 already done, 1 failed" in err
    assert "failed: " in err and "explode-test" in err and "RuntimeError: boom at call 5" in err
    rows = {r["policy"]: r for r in read_results(out)}
    assert rows["lru"]["status"] == "ok"
    bad = rows["explode-test"]
    assert bad["status"] == "error" and bad["error"].startswith("RuntimeError: boom at call 5 (at test_sweep.py:")
    assert "hit_rate" not in bad and bad["trace"] == "a.jsonl"
    # a rerun skips it; --retry-errors runs it again (and the last row of a hash is the one that counts)
    assert main([str(s), "-o", str(out), "--jobs", "1", "--no-progress"]) == 0
    assert main([str(s), "-o", str(out), "--jobs", "1", "--no-progress", "--retry-errors"]) == 1
    assert "1 run, 1 already done, 1 failed" in capsys.readouterr().err
    assert len(read_results(out)) == 2


def test_failures_in_worker_processes(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    make_trace(tmp_path / "traces" / "wide.jsonl", num_layers=3)  # another model: 3 MoE layers
    # a valid spec naming a valid trace, of the wrong model: static refuses it when the point runs
    text = HEAD.replace('["lru"]', '["lru", "static(trace=\'traces/wide.jsonl\')"]')
    sw = load_sweep(write_sweep(tmp_path, text))
    s = run_sweep(sw, tmp_path / "out", jobs=2)
    assert s.ran == 2 and len(s.errors) == 1
    assert "PolicySpecError: static: profile trace" in s.errors[0]["error"]


def test_csv_export(tmp_path: Path, traces, capsys) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, BASE)
    out = tmp_path / "out"
    assert main([str(s), "-o", str(out), "--jobs", "2", "--no-progress", "--export", "csv"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'results.csv'}"
    rows = read_results(out)
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) == 48
    by_hash = {r["config_hash"]: r for r in rows}
    for t in table:
        r = by_hash[t["config_hash"]]
        assert float(t["hit_rate"]) == r["hit_rate"] and float(t["tpot_s"]) == r["tpot_s"]
        assert t["policy"] == r["policy"] and int(t["cache_slots"]) == r["cache_slots"]
        assert t["ttft_s"] == ""  # None: no prefill in these traces
    assert list(table[0])[:3] == ["config_hash", "status", "trace"]
    assert export(out, "csv") == out / "results.csv"


def test_parquet_export(tmp_path: Path, traces, capsys) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, HEAD)
    out = tmp_path / "out"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert main([str(s), "-o", str(out), "--no-progress", "--export", "parquet"]) == 2
        err = capsys.readouterr().err
        assert err == "sim.sweep: error: --export parquet needs pyarrow, which is not installed (pip install pyarrow)\n"
        assert not out.exists()
        return
    assert main([str(s), "-o", str(out), "--no-progress", "--export", "parquet"]) == 0
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["hit_rate"] for r in table] == [r["hit_rate"] for r in read_results(out)]


def test_cli_argument_errors(tmp_path: Path, traces, capsys) -> None:  # type: ignore[no-untyped-def]
    s = write_sweep(tmp_path, HEAD)
    assert main([str(s), "-o", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert main([str(s), "-o", str(tmp_path / "o"), "--address", "x:1"]) == 2
    assert main([str(tmp_path / "none.toml"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sim.sweep: error: --jobs must be at least 1",
        "sim.sweep: error: --address needs --backend ray",
        f"sim.sweep: error: {tmp_path / 'none.toml'}: no such sweep file",
    ]


def test_results_folder_is_locked(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    from sim.sweep import ResultStore

    sw = load_sweep(write_sweep(tmp_path, HEAD))
    with ResultStore(tmp_path / "out"), pytest.raises(SweepError, match="another sweep is writing"):
        run_sweep(sw, tmp_path / "out", jobs=1)


def test_corrupt_row_in_the_middle_is_an_error(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    sw = load_sweep(write_sweep(tmp_path, BASE))
    run_sweep(sw, tmp_path / "out", jobs=1)
    f = tmp_path / "out" / RESULTS_FILE
    lines = f.read_text().splitlines()
    lines[3] = lines[3][:20]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(SweepError, match=r"results.jsonl:4: not a result row"):
        run_sweep(sw, tmp_path / "out", jobs=1)


# -- Ray ----------------------------------------------------------------------------------------------
def test_ray_backend_on_a_local_ray(tmp_path: Path, traces) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[dist]')")
    sw = load_sweep(write_sweep(tmp_path, BASE))
    local = run_sweep(sw, tmp_path / "local", jobs=1)
    assert local.ran == 48
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        s = run_sweep(sw, tmp_path / "ray", backend="ray")
    finally:
        ray.shutdown()
    assert s.ran == 48 and not s.errors
    want = {r["config_hash"]: _metric_keys(r) for r in read_results(tmp_path / "local")}
    got = {r["config_hash"]: _metric_keys(r) for r in read_results(tmp_path / "ray")}
    assert got == want
    assert s.parses <= 2 * 2 * 4  # kept per worker process (Ray may start a few more than num_cpus)


def test_ray_backend_on_an_existing_cluster(tmp_path: Path, traces, capsys) -> None:  # type: ignore[no-untyped-def]
    """`--address`: a Ray cluster started apart (`ray start --head`), which gets the packages shipped as
    py_modules; the results equal the local backend's. Then a cluster that is not there: one line."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[dist]')")
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.exists():
        pytest.skip("no ray command beside this Python")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([str(ray_cli), "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=120)
    found = re.search(r"ray start --address='([^']+)'", start.stdout + start.stderr)
    try:
        assert start.returncode == 0 and found, start.stdout + start.stderr
        sw = write_sweep(tmp_path, HEAD)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "disabled")
            mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
            assert main([str(sw), "-o", str(tmp_path / "ray"), "--no-progress", "--backend", "ray", "--address", found.group(1)]) == 0
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert main([str(sw), "-o", str(tmp_path / "local"), "--no-progress"]) == 0
    want = {r["config_hash"]: _metric_keys(r) for r in read_results(tmp_path / "local")}
    got = {r["config_hash"]: _metric_keys(r) for r in read_results(tmp_path / "ray")}
    assert got == want and len(got) > 0
    capsys.readouterr()


def test_ray_address_that_does_not_answer_is_one_line(tmp_path: Path, traces, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[dist]')")

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("Failed to connect to Ray cluster at 10.9.9.9:6379\nmore detail")

    monkeypatch.setattr(ray, "init", refuse)
    s = write_sweep(tmp_path, HEAD)
    assert main([str(s), "-o", str(tmp_path / "o"), "--no-progress", "--backend", "ray", "--address", "10.9.9.9:6379"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sim.sweep: error: cannot use the Ray cluster at 10.9.9.9:6379: Failed to connect")


def test_ray_backend_without_ray_is_a_clear_error(tmp_path: Path, traces, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    s = write_sweep(tmp_path, HEAD)
    assert main([str(s), "-o", str(tmp_path / "o"), "--backend", "ray"]) == 2
    assert capsys.readouterr().err == (
        "sim.sweep: error: --backend ray needs ray, which is not installed (pip install 'moe-offload-lab[dist]')\n"
    )
    assert not (tmp_path / "o").exists()
