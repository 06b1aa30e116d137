"""Tests of the trace format: writer, reader, converter, statistics, model presets, shipped traces.

Every trace here is written in tmp_path by the test itself, so a failure points at the code, not at a
fixture file.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import traces
from traces import convert, stats
from traces.io import TraceError, TraceReader, TraceWriter
from traces.models import PRESETS
from traces.schema import Header, LayerRecord, ModelSpec, Recording, StepRecord

REPO = Path(__file__).resolve().parent.parent
TRACES_DIR = Path(traces.__file__).resolve().parent


def toy_spec(num_layers: int = 2, num_experts: int = 8, top_k: int = 2) -> ModelSpec:
    return ModelSpec(
        name="toy", arch="toy", num_layers=num_layers, moe_layers=list(range(num_layers)), num_experts=num_experts,
        top_k=top_k, hidden_size=8, moe_intermediate_size=8, dtype="bf16", expert_bytes=1000, dense_bytes=0,
    )


def toy_header(**kw: Any) -> Header:
    return Header(model=toy_spec(**kw), recording=Recording(prompt_source="unit test"))


def layer(step: int, lay: int, topk: list[list[int]], phase: str = "decode", weights: Any = None) -> LayerRecord:
    if weights is None:
        weights = [[1.0 / len(row)] * len(row) for row in topk]
    return LayerRecord(step=step, phase=phase, layer=lay, tokens=len(topk), topk=topk, weights=weights)


def sample_records() -> list[LayerRecord | StepRecord]:
    out: list[LayerRecord | StepRecord] = []
    for step in range(3):
        phase = "prefill" if step == 0 else "decode"
        for lay in range(2):
            out.append(layer(step, lay, [[(step + lay) % 8, (step + lay + 1) % 8]], phase, [[0.75, 0.25]]))
        out.append(StepRecord(step=step, phase=phase, seq_ids=[0], latency_ns=1000 + step))
    return out


def write_sample(path: Path) -> list[LayerRecord | StepRecord]:
    recs = sample_records()
    with TraceWriter(path, toy_header()) as w:
        for r in recs:
            w.write(r)
    return recs


def write_lines(path: Path, objs: list[Any]) -> None:
    """Write raw JSON lines (bypassing the writer) to build broken traces."""
    text = "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def good_lines() -> list[dict[str, Any]]:
    """Header, two layer records of step 0, a step line and the footer, as dicts to corrupt."""
    return [
        toy_header().model_dump(mode="json"),
        {"kind": "layer", "step": 0, "phase": "decode", "layer": 0, "tokens": 1, "topk": [[0, 1]], "weights": [[0.5, 0.5]]},
        {"kind": "layer", "step": 0, "phase": "decode", "layer": 1, "tokens": 1, "topk": [[2, 3]], "weights": [[0.5, 0.5]]},
        {"kind": "step", "step": 0, "phase": "decode", "seq_ids": [0]},
        {"kind": "footer", "steps": 1, "layer_records": 2},
    ]


def read_all(path: Path, **kw: Any) -> list[Any]:
    return list(TraceReader(path, **kw))


# -- writer and reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    recs = write_sample(path)
    reader = TraceReader(path)
    assert reader.header == toy_header()
    assert list(reader) == recs
    assert reader.footer is not None and (reader.footer.steps, reader.footer.layer_records) == (3, 6)
    assert not reader.truncated
    assert list(reader) == recs, "a second pass over the same reader reads the same records"
    assert len(list(reader.layer_records())) == 6
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_writer_is_deterministic_and_readable_by_others(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_sample(a)
    write_sample(b)
    assert a.read_bytes() == b.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_writer_atomic(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    with pytest.raises(RuntimeError):
        with TraceWriter(target, toy_header()) as w:
            w.write(layer(0, 0, [[0, 1]]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [], "no trace and no temporary file left behind"

    target.write_bytes(b"earlier trace")
    with pytest.raises(RuntimeError):
        with TraceWriter(target, toy_header()) as w:
            w.write(layer(0, 0, [[0, 1]]))
            raise RuntimeError("boom")
    assert target.read_bytes() == b"earlier trace"
    assert list(tmp_path.iterdir()) == [target]


def _expect_error(path: Path, line: int, field: str | None, fragment: str, **kw: Any) -> TraceError:
    with pytest.raises(TraceError) as info:
        read_all(path, **kw)
    err = info.value
    assert (err.line, err.field) == (line, field), str(err)
    assert fragment in err.message, str(err)
    prefix = f"{path}:{line}: {field}: " if field else f"{path}:{line}: "
    assert str(err).startswith(prefix) and "\n" not in str(err)
    return err


def _corrupt(index: int, change: Any) -> list[Any]:
    lines: list[Any] = good_lines()
    if callable(change):
        change(lines[index])
    else:
        lines[index] = change
    return lines


# (lines, expected line number, field, fragment of the message)
BAD_TRACES: dict[str, tuple[list[Any], int, str | None, str]] = {
    "bad JSON": (_corrupt(2, '{"kind": "layer", "step": 0,'), 3, None, "bad JSON"),
    "wrong version": (_corrupt(0, lambda h: h.update(version=2)), 1, "version", "unsupported version 2"),
    "missing header": (good_lines()[1:], 1, "kind", "missing header"),
    "expert out of range": (_corrupt(2, lambda r: r.update(topk=[[2, 8]])), 3, "topk.0", "expert id 8 out of range"),
    "topk row length": (_corrupt(1, lambda r: r.update(topk=[[0]], weights=[[1.0]])), 2, "topk.0", "top_k is 2"),
    "NaN weight": (_corrupt(1, lambda r: r.update(weights=[[float("nan"), 0.5]])), 2, "weights.0.0", "finite number"),
    "weights rows": (_corrupt(1, lambda r: r.update(weights=[[0.5, 0.5], [0.5, 0.5]])), 2, "weights", "tokens=1"),
    "layer out of range": (_corrupt(2, lambda r: r.update(layer=2)), 3, "layer", "2 out of range"),
    "footer count": (_corrupt(4, lambda f: f.update(layer_records=3)), 5, "layer_records", "counts 3"),
    "footer steps": (_corrupt(4, lambda f: f.update(steps=2)), 5, "steps", "counts 2 steps"),
    "unknown kind": (_corrupt(3, lambda s: s.update(kind="stpe")), 4, "kind", "unknown record kind 'stpe'"),
    "step goes back": (good_lines()[:2] + [
        {"kind": "layer", "step": 1, "phase": "decode", "layer": 0, "tokens": 1, "topk": [[0, 1]], "weights": [[0.5, 0.5]]},
        {"kind": "layer", "step": 0, "phase": "decode", "layer": 1, "tokens": 1, "topk": [[0, 1]], "weights": [[0.5, 0.5]]},
    ], 4, "step", "goes back"),
    "unknown field": (_corrupt(1, lambda r: r.update(expert=[1])), 2, "expert", "Extra inputs"),
    "second header": (_corrupt(3, toy_header().model_dump(mode="json")), 4, "kind", "second header"),
    "lookahead odd digit": (_corrupt(1, lambda r: r.update(lookahead={"\u00b2": [[0, 1]]})), 2, "lookahead",
                            "not a layer index"),
    "lookahead backwards": (_corrupt(2, lambda r: r.update(lookahead={"0": [[0, 1]]})), 3, "lookahead.0",
                            "not after layer 1"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_reader_errors(tmp_path: Path, case: str, suffix: str) -> None:
    lines, lineno, field, fragment = BAD_TRACES[case]
    path = tmp_path / f"bad{suffix}"
    write_lines(path, lines)
    _expect_error(path, lineno, field, fragment)


def test_error_stays_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_lines(path, _corrupt(1, lambda r: r.update({"bad\nname": 1})))
    with pytest.raises(TraceError) as info:
        read_all(path)
    assert info.value.field == "bad\nname"
    assert str(info.value) == f"{path}:2: bad\\nname: Extra inputs are not permitted"


def test_truncated_without_footer(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_lines(path, good_lines()[:-1])
    _expect_error(path, 4, None, "no footer")
    reader = TraceReader(path, allow_truncated=True)
    recs = list(reader)
    assert reader.truncated and reader.footer is None
    assert [type(r) for r in recs] == [LayerRecord, LayerRecord, StepRecord]


def test_truncated_half_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    text = "".join(json.dumps(o) + "\n" for o in good_lines()[:3])
    path.write_text(text + '{"kind": "step", "st')  # interrupted while writing line 4
    _expect_error(path, 4, None, "bad JSON")
    reader = TraceReader(path, allow_truncated=True)
    assert len(list(reader)) == 2 and reader.truncated


def test_gzip_cut_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with TraceWriter(path, toy_header()) as w:
        for step in range(400):
            w.write(layer(step, step % 2, [[step % 8, (step + 3) % 8]], weights=[[step / 400, 1 - step / 400]]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError) as info:
        read_all(path)
    assert "truncated or corrupt compressed data" in str(info.value)
    assert str(info.value).startswith(f"{path}:")
    reader = TraceReader(path, allow_truncated=True)
    n = len(list(reader))
    assert reader.truncated and 0 < n < 400


def test_gzip_corrupt_bytes_give_trace_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl.gz"
    write_sample(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.jsonl.gz"
    for i in range(10, len(data)):  # past the gzip header: damaged deflate data, CRC or length
        damaged = bytearray(data)
        damaged[i] ^= 0x55
        bad.write_bytes(bytes(damaged))
        try:
            read_all(bad)
        except TraceError:
            pass  # any other exception fails the test


def test_non_utf8_is_blamed_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(o).encode() for o in good_lines()]
    filler = [lines[1]] * 300  # enough lines that the bad byte lies far past the first read buffer
    raw = [lines[0], *filler, b'{"kind": "step", "step": 0, "phase": "d\xffcode"}', lines[-1]]
    path.write_bytes(b"\n".join(raw) + b"\n")
    _expect_error(path, 302, None, "not UTF-8")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        TraceReader(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="directory"):
        TraceReader(tmp_path)


# -- converter -------------------------------------------------------------------------------------------


def vllm_rows(drop: tuple[int, int, int] | None = None) -> list[dict[str, Any]]:
    """Layer-major rows of problem 7 (2 tokens) before problem 3 (3 tokens), as the patch writes them."""
    rows = []
    for pid, n_tokens in ((7, 2), (3, 3)):
        for lay in range(32):
            for tok in range(n_tokens):
                if (pid, tok, lay) == drop:
                    continue
                e = (pid + tok + lay) % 8
                rows.append({"dataset": "toyset", "problem_id": pid, "layer": lay, "token_idx": tok,
                             "experts": [e, (e + 3) % 8], "gating_probs": [0.625, 0.375]})
    return rows


def write_vllm(path: Path, rows: list[Any], gz: bool = False) -> None:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_convert_vllm_routing(tmp_path: Path, gz: bool, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "routing.jsonl"  # no .gz suffix even when compressed: the magic bytes decide
    write_vllm(src, vllm_rows(drop=(3, 1, 5)), gz=gz)
    out = tmp_path / "out.jsonl.gz"
    assert convert.main(["--from", "vllm-routing", str(src), "--model", "mixtral-8x7b", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 (token, layer) pairs missing" in err

    reader = TraceReader(out)
    rec = reader.header.recording
    assert reader.header.model.name == "mixtral-8x7b" and reader.header.model.dtype == "bf16"
    assert rec.link is None and rec.policy is None
    extra = rec.model_extra or {}
    assert extra["source_file"] == "routing.jsonl" and extra["rows"] == 5 * 32 - 1
    assert extra["missing_pairs"] == 1 and extra["sequences"] == 2 and "source" in extra
    assert rec.prompt_source == "toyset: problem_id 3, 7"

    recs = list(reader)
    layers = [r for r in recs if isinstance(r, LayerRecord)]
    step_lines = [r for r in recs if isinstance(r, StepRecord)]
    assert len(layers) == 5 * 32 - 1
    # steps in (problem_id, token_idx) order: problem 3 tokens 0..2, then problem 7 tokens 0..1
    assert [(s.step, s.seq_ids) for s in step_lines] == [(0, [3]), (1, [3]), (2, [3]), (3, [7]), (4, [7])]
    assert all(s.phase == "decode" for s in step_lines)
    for step, (pid, tok) in enumerate([(3, 0), (3, 1), (3, 2), (7, 0), (7, 1)]):
        mine = [r for r in layers if r.step == step]
        expect_layers = [lay for lay in range(32) if (pid, tok, lay) != (3, 1, 5)]
        assert [r.layer for r in mine] == expect_layers
        for r in mine:
            e = (pid + tok + r.layer) % 8
            assert (r.tokens, r.phase, r.topk, r.weights) == (1, "decode", [[e, (e + 3) % 8]], [[0.625, 0.375]])
    # each step's layer records come right before its step line
    kinds = [(type(r).__name__, r.step) for r in recs]
    assert kinds.index(("StepRecord", 1)) == kinds.index(("LayerRecord", 2)) - 1


def test_convert_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "routing.jsonl.gz"
    write_vllm(src, vllm_rows(), gz=True)
    outs = [tmp_path / "a" / "t.jsonl.gz", tmp_path / "b" / "t.jsonl.gz"]
    for out in outs:
        assert convert.main(["--from", "vllm-routing", str(src), "--model", "mixtral-8x7b", "-o", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def _row(**kw: Any) -> dict[str, Any]:
    row = {"problem_id": 0, "layer": 0, "token_idx": 9, "experts": [1, 2], "gating_probs": [0.6, 0.4]}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not None}


BAD_ROWS: dict[str, tuple[Any, str]] = {
    "bad JSON": ('{"layer": 0, "token_idx": ', "line"),
    "not an object": ("[1, 2]", "line"),
    "missing layer": (_row(layer=None), "layer"),
    "missing experts": (_row(experts=None), "experts"),
    "missing gating_probs": (_row(gating_probs=None), "gating_probs"),
    "missing token_idx": (_row(token_idx=None), "token_idx"),
    "layer too big": (_row(layer=32), "layer"),
    "layer negative": (_row(layer=-1), "layer"),
    "layer not int": (_row(layer="3"), "layer"),
    "expert out of range": (_row(experts=[1, 8]), "experts"),
    "too many experts": (_row(experts=[1, 2, 3], gating_probs=[0.5, 0.3, 0.2]), "experts"),
    "too few experts": (_row(experts=[1], gating_probs=[1.0]), "experts"),
    "repeated expert": (_row(experts=[2, 2]), "experts"),
    "weights length": (_row(gating_probs=[1.0]), "gating_probs"),
    "NaN weight": ('{"problem_id": 0, "layer": 0, "token_idx": 9, "experts": [1, 2], "gating_probs": [NaN, 0.5]}',
                   "gating_probs"),
    "negative weight": (_row(gating_probs=[1.5, -0.5]), "gating_probs"),
    "duplicate": (_row(token_idx=1, layer=1), "layer"),
    "bad problem_id": (_row(problem_id="p0"), "problem_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_convert_bad_row(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad, field = BAD_ROWS[case]
    good = [_row(token_idx=t, layer=1) for t in range(3)]
    src = tmp_path / "routing.jsonl"
    write_vllm(src, [*good, "", bad, _row(token_idx=20)])  # a blank line still counts: the bad row is line 5
    out = tmp_path / "out.jsonl"
    code = convert.main(["--from", "vllm-routing", str(src), "--model", "mixtral-8x7b", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{src}:5: {field}: "), err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_convert_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "routing.jsonl.gz"
    src.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in vllm_rows()) + "\n").encode())[:300])
    out = tmp_path / "out.jsonl"
    assert convert.main(["--from", "vllm-routing", str(src), "--model", "mixtral-8x7b", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "truncated or corrupt" in err
    assert convert.main(["--from", "vllm-routing", str(tmp_path / "nope"), "--model", "mixtral-8x7b", "-o", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_convert_subprocess(tmp_path: Path) -> None:
    src = tmp_path / "routing.jsonl"
    write_vllm(src, vllm_rows(drop=(7, 0, 31)))
    out = tmp_path / "out.jsonl.gz"
    done = _run_module("traces.convert", "--from", "vllm-routing", str(src), "--model", "mixtral-8x7b",
                       "--dtype", "fp8", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "1 (token, layer) pairs missing" in done.stderr
    reader = TraceReader(out)
    assert reader.header.model.dtype == "fp8"
    assert sum(1 for _ in reader.layer_records()) == 5 * 32 - 1

    write_vllm(src, [*vllm_rows()[:4], _row(experts=[0, 9])])
    done = _run_module("traces.convert", "--from", "vllm-routing", str(src), "--model", "mixtral-8x7b", "-o",
                       str(tmp_path / "bad.jsonl"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"{src}:5: experts: expert id 9 out of range: num_experts=8"]


# -- statistics ------------------------------------------------------------------------------------------


def stats_trace(path: Path) -> None:
    """2 layers, 8 experts. Distinct experts per call, by layer:
    layer 0: {0,1} {0,2} {0,1} {0,3} {1,5} {2,6}   layer 1: {2,3} {2,3} {0,1} {2,3} (no call at step 4) {0,1}
    """
    recs = [
        layer(0, 0, [[0, 1], [1, 0], [0, 1]], "prefill"), layer(0, 1, [[2, 3], [3, 2], [2, 3]], "prefill"),
        layer(1, 0, [[0, 2]]), layer(1, 1, [[2, 3]]),
        layer(2, 0, [[0, 1], [1, 0]]), layer(2, 1, [[0, 1], [1, 0]]),
        layer(3, 0, [[0, 3]]), layer(3, 1, [[3, 2]]),
        layer(4, 0, [[1, 5]]),
        layer(5, 0, [[6, 2]]), layer(5, 1, [[0, 1]]),
    ]
    with TraceWriter(path, toy_header()) as w:
        for r in recs:
            w.write(r)
            if r.layer == 1 or r.step == 4:
                w.write(StepRecord(step=r.step, phase=r.phase, seq_ids=[0]))


def _norm_entropy(counts: list[int], n: int) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts) / math.log(n)


def test_stats_exact(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    stats_trace(path)
    s = stats.trace_stats(path)
    assert s["steps"] == {"prefill": 1, "decode": 5, "total": 6}
    assert s["tokens"] == {"prefill": 3, "decode": 6, "total": 9}
    assert s["layer_records"] == 11
    assert s["top25pct_experts"] == 2
    l0, l1 = s["layers"]
    # layer 0 counts: e0 4, e1 3, e2 2, e3 1, e5 1, e6 1 (12 accesses in 6 calls)
    assert (l0["calls"], l0["accesses"], l0["distinct_experts"]) == (6, 12, 6)
    assert l0["top1_share"] == pytest.approx(4 / 12)
    assert l0["top25pct_share"] == pytest.approx(7 / 12)
    assert l0["entropy"] == pytest.approx(_norm_entropy([4, 3, 2, 1, 1, 1], 8))
    # layer 1 counts: e2 3, e3 3, e0 2, e1 2 (10 accesses in 5 calls)
    assert (l1["calls"], l1["accesses"], l1["distinct_experts"]) == (5, 10, 4)
    assert l1["top1_share"] == pytest.approx(0.3)
    assert l1["top25pct_share"] == pytest.approx(0.6)
    assert l1["entropy"] == pytest.approx(_norm_entropy([3, 3, 2, 2], 8))
    # reuse distances: layer 0: 1, 1, 2, 1, 2, 4; layer 1: 1, 1, 2, 2, 2, 2 -> five 1s, six 2s, one 4
    r = s["reuse"]
    assert (r["accesses"], r["compulsory"], r["reused"]) == (22, 10, 12)
    assert (r["p25"], r["p50"], r["p75"], r["p90"]) == (1, 2, 2, 2)
    assert r["within_1"] == pytest.approx(5 / 22)
    assert r["within_2"] == pytest.approx(11 / 22)
    assert r["within_4"] == pytest.approx(12 / 22)


def test_stats_quantile_nearest_rank() -> None:
    from collections import Counter

    hist = Counter({1: 5, 2: 6, 4: 1})
    assert [stats._quantile(hist, 12, q) for q in (0.25, 0.5, 0.75, 0.9, 1.0)] == [1, 2, 2, 2, 4]
    assert stats._quantile(Counter(), 0, 0.5) is None


def test_stats_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.jsonl.gz"
    stats_trace(path)
    assert stats.main([str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert list(obj) == sorted(obj)
    assert obj["reuse"]["compulsory"] == 10 and obj["model"]["name"] == "toy"

    assert stats.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "layer records  11" in text and "p25 1, p50 2, p75 2, p90 2" in text
    table = [line for line in text.splitlines() if line.lstrip()[:1].isdigit() or line.startswith("layer  calls")]
    assert len(table) == 3 and len({len(line) for line in table}) == 1, "an aligned table"

    bad = tmp_path / "bad.jsonl"
    write_lines(bad, good_lines()[:-1])
    assert stats.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:4: ") and len(err.strip().splitlines()) == 1
    assert stats.main([str(bad), "--allow-truncated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is True


def test_stats_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    stats_trace(path)
    done = _run_module("traces.stats", str(path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layer_records"] == 11


# -- model presets and shipped traces --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_total_params_match_model_card(name: str) -> None:
    d = PRESETS[name]
    assert d.stated_total_b > 0
    assert d.total_params / 1e9 == pytest.approx(d.stated_total_b, rel=0.01)


SHIPPED = {
    "mixtral-8x7b-gsm8k.jsonl.gz": (247, 7889, 15),
    "mixtral-8x7b-humaneval.jsonl.gz": (338, 10779, 37),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_traces(name: str) -> None:
    steps, records, missing = SHIPPED[name]
    reader = TraceReader(TRACES_DIR / name)
    assert reader.header.model.name == "mixtral-8x7b"
    n_layer = n_step = 0
    for rec in reader:
        if isinstance(rec, LayerRecord):
            n_layer += 1
            assert rec.phase == "decode" and rec.tokens == 1
        else:
            n_step += 1
    assert (n_step, n_layer) == (steps, records)
    assert reader.footer is not None and reader.footer.steps == steps
    extra = reader.header.recording.model_extra or {}
    assert extra["missing_pairs"] == missing == steps * 32 - records
    assert reader.header.recording.policy is None and reader.header.recording.link is None
