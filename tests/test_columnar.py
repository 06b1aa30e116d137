"""The columnar reader against the streaming one: the same verdict on every trace (the same one-line
error, or the same records), its on-disk cache (stale, corrupt, unwritable), and the requests the
engine gets from its columns against those `request_from_record` makes."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.calls import future, requests
from sim.engine import request_from_record
from traces import trace_cache
from traces.columnar import _from_reader, build_columnar, read_columnar
from traces.io import TraceError, TraceReader, TraceWriter
from traces.schema import ExpertLoad, Fields, Header, LayerRecord, Measured, Recording, StepRecord
from traces.synthetic import toy_model

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "traces").glob("*.jsonl.gz"))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every cache of this module goes to a folder of its own (never beside the shipped traces)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOE_LAB_TRACE_CACHE", str(folder))
    return folder


def _rich_trace(path: Path, *, steps: int = 5, fields: bool = True, seed: int = 0) -> Path:
    """3 MoE layers, 6 experts, top-2; a prefill step of 3 rows then decode steps; every optional
    field on every record (probs, look-ahead, importance, plan, measured) and step records."""
    rng = random.Random(seed)
    model = toy_model(num_layers=3, num_experts=6, top_k=2, expert_bytes=1000)
    flags = Fields(probs=True, lookahead=True, importance=True, measured=True, plan=True) if fields else Fields()
    header = Header(model=model, recording=Recording(prompt_source="columnar test"), fields=flags)
    with TraceWriter(path, header) as w:
        for s in range(steps):
            tokens = 3 if s == 0 else 1
            phase = "prefill" if s == 0 else "decode"
            for layer in range(3):
                topk = [rng.sample(range(6), 2) for _ in range(tokens)]
                ws = [[round(rng.random(), 6), round(rng.random(), 6)] for _ in range(tokens)]
                extra: dict[str, Any] = {}
                if fields:
                    extra = {
                        "probs": [[round(rng.random(), 4) for _ in range(6)] for _ in range(tokens)],
                        "lookahead": {str(t): [rng.sample(range(6), 2) for _ in range(tokens)] for t in range(layer + 1, 3)},
                        "importance": [round(rng.random(), 3) for _ in range(tokens)],
                        "plan": {"loads": [[layer, topk[0][0]]], "evict": []},
                        "measured": Measured(start_ns=s * 100, end_ns=s * 100 + 50,
                                             loads=[ExpertLoad(expert=topk[0][1], start_ns=1, end_ns=2)]),
                    }
                w.write(LayerRecord(step=s, phase=phase, layer=layer, tokens=tokens, topk=topk, weights=ws, **extra))
            w.write(StepRecord(step=s, phase=phase, seq_ids=[0, 1], latency_ns=1000 + s if s % 2 else None))
    return path


def _norm(rec: Any) -> str:
    d = rec.model_dump()
    if d.get("lookahead") is not None:  # what a request sees: integer layer keys (the last of equal ones)
        d["lookahead"] = {str(k): v for k, v in {int(k): v for k, v in d["lookahead"].items()}.items()}
    return json.dumps(d, sort_keys=True, default=repr)


def stream_verdict(path: Path, allow_truncated: bool = False) -> tuple[str, Any]:
    try:
        reader = TraceReader(path, allow_truncated=allow_truncated)
        return "ok", [_norm(r) for r in reader]
    except (TraceError, ValueError, RecursionError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"


def columnar_verdict(path: Path, allow_truncated: bool = False, cache: bool = False) -> tuple[str, Any]:
    try:
        col = read_columnar(path, allow_truncated=allow_truncated, cache=cache)
        return "ok", [_norm(r) for r in col.records()]
    except (TraceError, ValueError, RecursionError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"


# -- the same verdict as the streaming reader -------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_traces_give_the_streaming_records(path: Path) -> None:
    reader = TraceReader(path)
    col = build_columnar(reader)
    assert col.sha256 == __import__("traces.io", fromlist=["file_digest"]).file_digest(path)
    assert [_norm(r) for r in col.records()] == [_norm(r) for r in TraceReader(path)]
    slow = _from_reader(TraceReader(path))
    for name in ("step", "layer", "prefill", "row_ptr", "topk", "weights", "probs", "importance", "la_ptr", "la_target", "la_topk"):
        assert np.array_equal(getattr(col, name), getattr(slow, name)), name


def _values(rng: random.Random) -> Any:
    return rng.choice([
        True, False, None, -1, 0, 1, 2, 5, 6, 99, 1.0, 2.5, -0.0, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30,
        "1", "decode", "prefill", "", [], [[]], [[0, 1]], [[1, 1]], [[0, 1, 2]], {}, {"1": [[0, 1]]}, {"x": 1},
        float("nan"), float("inf"), [[0.5, 0.5]], [[True, 0]], [[0, 1]] * 3, [0.5], [[1e308, 1e308]],
    ])


def _mutate_obj(obj: Any, rng: random.Random, depth: int = 0) -> Any:
    """Change one thing somewhere inside a parsed line."""
    if isinstance(obj, dict) and obj and (depth == 0 or rng.random() < 0.7):
        key = rng.choice(list(obj))
        r = rng.random()
        if r < 0.15:
            del obj[key]
        elif r < 0.25:
            obj[rng.choice(["bogus", "kind", "probs", "plan", "lookahead", "importance", "measured", "02", "1"])] = _values(rng)
        elif r < 0.6 and isinstance(obj[key], (dict, list)) and obj[key]:
            obj[key] = _mutate_obj(obj[key], rng, depth + 1)
        else:
            obj[key] = _values(rng)
        return obj
    if isinstance(obj, list) and obj:
        i = rng.randrange(len(obj))
        r = rng.random()
        if r < 0.15:
            del obj[i]
        elif r < 0.25:
            obj.append(obj[i] if rng.random() < 0.5 else _values(rng))
        elif isinstance(obj[i], (dict, list)) and obj[i] and r < 0.6:
            obj[i] = _mutate_obj(obj[i], rng, depth + 1)
        else:
            obj[i] = _values(rng)
        return obj
    return _values(rng)


def _mutations(lines: list[str], rng: random.Random) -> list[str]:
    """One mutation of the file's lines: a value, a line's text, or the lines themselves."""
    out = list(lines)
    i = rng.randrange(1, len(out))
    r = rng.random()
    if r < 0.55:
        obj = json.loads(out[i])
        out[i] = json.dumps(_mutate_obj(obj, rng), separators=(",", ":"))
    elif r < 0.62:
        out.insert(i, out[i])  # a repeated record
    elif r < 0.67:
        j = rng.randrange(1, len(out))
        out[i], out[j] = out[j], out[i]
    elif r < 0.72:
        del out[i]
    elif r < 0.76:
        out[i] = " " + out[i]
    elif r < 0.80:
        out[i] = out[i] + " \r"
    elif r < 0.84:
        out.insert(i, rng.choice(["", "   ", "\t"]))
    elif r < 0.87:
        out[i] = out[i][: rng.randrange(len(out[i]))]
    elif r < 0.90:
        out[i] = out[i] + ", {}"
    elif r < 0.93:
        out.append(rng.choice(['{"kind":"step","step":0,"phase":"decode"}', out[0], "{}", "[]", "7"]))
    elif r < 0.96:
        out[i] = out[i].replace('"step":', '"step":' + rng.choice(["0", "1", "-", "01", "1e2"]), 1)
    else:
        out[i] = out[i].replace('"kind":"layer"', '"kind":"layer","kind":"step"', 1)
    return out


def _write_lines(path: Path, lines: list[str], gz: bool, cut: bool = False) -> None:
    text = ("\n".join(lines) + ("" if cut else "\n")).encode("utf-8", "surrogatepass")
    path.write_bytes(gzip.compress(text, mtime=0) if gz else text)


def test_mutated_traces_get_the_streaming_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of traces, each with one thing broken (or not broken at all: a harmless change must be
    read alike too): the columnar reader raises the streaming reader's exact error, or gives its records."""
    rng = random.Random(1234)
    base = _rich_trace(tmp_path / "base.jsonl")  # fields promised: the streaming reader reads it
    plain = _rich_trace(tmp_path / "plain.jsonl", fields=False, steps=8, seed=1)  # a prefill call: the JSON checks
    decode = plain.read_text().splitlines()  # one-token decode calls only: the canonical lines' checks
    decode = [decode[0], *(x for x in decode[1:] if '"tokens":3' not in x and '"step":0,' not in x)]
    decode[-1] = '{"kind":"footer","steps":7,"layer_records":21}'
    sources = [base.read_text().splitlines(), plain.read_text().splitlines(), decode]
    seen = {"ok": 0, "error": 0, "careful": 0}
    import traces.columnar as columnar

    careful = columnar._from_reader

    def counted(reader: TraceReader) -> Any:
        seen["careful"] += 1
        return careful(reader)

    monkeypatch.setattr(columnar, "_from_reader", counted)
    for n in range(400):
        lines = _mutations(rng.choice(sources), rng)
        if rng.random() < 0.3:
            lines = _mutations(lines, rng)
        gz = n % 5 == 0
        path = tmp_path / f"m{n}.jsonl{'.gz' if gz else ''}"
        _write_lines(path, lines, gz, cut=n % 17 == 0)
        for allow in (False, True) if n % 7 == 0 else (False,):
            want = stream_verdict(path, allow)
            got = columnar_verdict(path, allow)
            if want[0] == "ok" and "beyond the int64 range" in str(got[1]):
                continue  # an integer the schema does not bound yet (a bounded schema refuses it first)
            assert got == want, (n, allow, lines)
            seen[want[0]] += 1
    # both verdicts exercised, and traces accepted by the vectorised checks themselves (every error
    # comes from the streaming reader; so do the harmless changes these checks were not written for)
    assert seen["ok"] > 30 and seen["error"] > 200, seen
    assert seen["ok"] - (seen["careful"] - seen["error"]) > 10, seen


@pytest.mark.parametrize("case", ["bad utf-8", "cut gzip", "no footer", "after footer", "header twice", "blank lines",
                                  "footer counts", "step back", "repeat layer", "huge int", "deep nesting"])
def test_edge_cases_get_the_streaming_verdict(tmp_path: Path, case: str) -> None:
    src = _rich_trace(tmp_path / "src.jsonl").read_bytes()
    lines = src.decode().splitlines()
    path = tmp_path / "t.jsonl"
    if case == "bad utf-8":
        data = src.replace(b'"decode"', b'"dec\xffode"', 1)
    elif case == "cut gzip":
        path = tmp_path / "t.jsonl.gz"
        z = gzip.compress(src, mtime=0)
        data = z[: len(z) // 2]
    elif case == "no footer":
        data = ("\n".join(lines[:-1]) + "\n").encode()
    elif case == "after footer":
        data = ("\n".join([*lines, lines[3]]) + "\n").encode()
    elif case == "header twice":
        data = ("\n".join([*lines[:3], lines[0], *lines[3:]]) + "\n").encode()
    elif case == "blank lines":
        data = ("\n".join([lines[0], "", *lines[1:4], "  ", *lines[4:], "", ""]) + "\n").encode()
    elif case == "footer counts":
        data = ("\n".join([*lines[:-1], '{"kind":"footer","steps":5,"layer_records":99}']) + "\n").encode()
    elif case == "step back":
        data = ("\n".join([*lines[:6], lines[2], *lines[6:]]) + "\n").encode()
    elif case == "repeat layer":
        data = ("\n".join([*lines[:6], lines[5], *lines[6:]]) + "\n").encode()
    elif case == "huge int":
        data = src.replace(b'"step":1,', b'"step":' + b"9" * 5000 + b",", 1)
    else:
        data = src.replace(b'"plan":{', b'"plan":{"deep":' + b"[" * 100000 + b"]" * 100000 + b",", 1)
    path.write_bytes(data)
    for allow in (False, True):
        assert columnar_verdict(path, allow) == stream_verdict(path, allow)


# -- the requests ----------------------------------------------------------------------------------
def _same_request(a: Any, b: Any) -> None:
    assert (a.step, a.phase, a.layer, a.tokens) == (b.step, b.phase, b.layer, b.tokens)
    assert a.keys_in_access_order() == b.keys_in_access_order()
    assert a.tokens_per_expert() == b.tokens_per_expert()
    assert a.total_mass == b.total_mass or (math.isnan(a.total_mass) and math.isnan(b.total_mass))
    assert np.array_equal(a.topk, b.topk) and a.topk.dtype == b.topk.dtype
    assert np.array_equal(a.weights, b.weights) and a.weights.dtype == b.weights.dtype
    for name in ("probs", "importance"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y))
    la, lb = a.lookahead, b.lookahead
    assert (la is None) == (lb is None)
    if la is not None:
        assert list(la) == list(lb) and all(np.array_equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("name", ["rich", *[p.name for p in SHIPPED]])
def test_requests_equal_those_made_from_the_records(tmp_path: Path, name: str) -> None:
    path = _rich_trace(tmp_path / "t.jsonl", steps=9) if name == "rich" else ROOT / "traces" / name
    col = read_columnar(path, cache=False)
    mine = list(requests(col))
    theirs = [request_from_record(r) for r in TraceReader(path).layer_records()]
    assert len(mine) == len(theirs) == col.n
    for a, b in zip(mine, theirs, strict=True):
        _same_request(a, b)
    from policies import Future

    assert [list(c) for c in future(col).calls] == [list(c) for c in Future.from_trace(path).calls]


def test_a_policy_cannot_change_the_trace_through_a_request(tmp_path: Path) -> None:
    col = read_columnar(_rich_trace(tmp_path / "t.jsonl"), cache=False)
    before = col.topk.copy()
    for r in requests(col):
        r.topk[...] = 0
        r.weights[...] = 0.0
        if r.lookahead:
            for v in r.lookahead.values():
                v[...] = 0
    assert np.array_equal(col.topk, before)
    assert list(requests(col))[0].lookahead  # still there


def test_ties_and_heavier_second_experts_order_alike(tmp_path: Path) -> None:
    """One-token calls of top-2 and top-4 with tied, reversed and equal weights: the vectorised order
    is LayerRequest's."""
    for top_k in (2, 4):
        model = toy_model(num_layers=2, num_experts=8, top_k=top_k)
        header = Header(model=model)
        path = tmp_path / f"ties{top_k}.jsonl"
        rng = random.Random(top_k)
        with TraceWriter(path, header) as w:
            for s in range(60):
                for layer in range(2):
                    ids = rng.sample(range(8), top_k)
                    ws = [rng.choice([0.25, 0.5, 0.5, -0.0, 0.0, 1e-300, 0.1]) for _ in range(top_k)]
                    w.write(LayerRecord(step=s, phase="decode", layer=layer, tokens=1, topk=[ids], weights=[ws]))
        col = read_columnar(path, cache=False)
        for a, b in zip(requests(col), (request_from_record(r) for r in TraceReader(path).layer_records()), strict=True):
            _same_request(a, b)


# -- the cache -------------------------------------------------------------------------------------
def test_a_second_read_comes_from_the_cache(tmp_path: Path, _cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rich_trace(tmp_path / "t.jsonl")
    first = read_columnar(path)
    files = list(_cache_dir.glob("*.npz"))
    assert [f.name for f in files] == [f"{first.sha256}.npz"]
    import traces.columnar as columnar

    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError("parsed again")

    monkeypatch.setattr(columnar, "build_columnar", fail)
    second = read_columnar(path)
    assert [_norm(r) for r in second.records()] == [_norm(r) for r in first.records()]
    assert second.path == path and second.sha256 == first.sha256


def test_a_changed_trace_is_not_read_from_its_old_cache(tmp_path: Path) -> None:
    path = _rich_trace(tmp_path / "t.jsonl", seed=1)
    read_columnar(path)
    _rich_trace(path, seed=2)
    assert columnar_verdict(path, cache=True) == stream_verdict(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "other reader", "wrong shape"])
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, _cache_dir: Path, damage: str) -> None:
    path = _rich_trace(tmp_path / "t.jsonl")
    col = read_columnar(path)
    (cached,) = _cache_dir.glob("*.npz")
    data = cached.read_bytes()
    if damage == "truncate":
        cached.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        mid = len(data) // 2
        cached.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    elif damage == "garbage":
        cached.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        cached.write_bytes(b"")
    else:
        with np.load(cached) as z:
            arrays = dict(z)
        meta = json.loads(bytes(arrays["meta"]).decode())
        if damage == "other reader":
            meta["reader"] = "0" * 32
        else:
            arrays["topk"] = arrays["topk"][:-1]
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(cached, "wb") as fh:
            np.savez(fh, **arrays)
    again = read_columnar(path)
    assert [_norm(r) for r in again.records()] == [_norm(r) for r in col.records()]
    with np.load(cached) as z:  # rebuilt
        assert json.loads(bytes(z["meta"]).decode())["reader"] == trace_cache.READER


def test_cache_beside_the_trace_else_in_the_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_LAB_TRACE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    here = tmp_path / "here"
    here.mkdir()
    path = _rich_trace(here / "t.jsonl")
    col = read_columnar(path)
    beside = here / ".t.jsonl.columnar.npz"
    assert beside.exists() and not (tmp_path / "xdg").exists()
    assert oct(beside.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    # where the cache beside the trace cannot be written (here: a folder in its place, which even
    # root cannot replace by a file), the user cache folder holds it
    there = tmp_path / "there"
    there.mkdir()
    shutil.copy(path, there / "t.jsonl")
    (there / ".t.jsonl.columnar.npz").mkdir()
    first = read_columnar(there / "t.jsonl")
    cached = tmp_path / "xdg" / "moe-offload-lab" / "traces" / f"{col.sha256}.npz"
    assert cached.exists()
    again = read_columnar(there / "t.jsonl")
    assert [_norm(r) for r in again.records()] == [_norm(r) for r in first.records()]


def test_unwritable_everywhere_still_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MOE_LAB_TRACE_CACHE", str(blocker / "sub"))
    path = _rich_trace(tmp_path / "t.jsonl")
    assert columnar_verdict(path, cache=True) == stream_verdict(path)


def test_cache_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_LAB_TRACE_CACHE", "off")
    path = _rich_trace(tmp_path / "t.jsonl")
    read_columnar(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "t.jsonl"] or sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_a_truncated_trace_from_the_cache_still_needs_the_flag(tmp_path: Path) -> None:
    src = _rich_trace(tmp_path / "src.jsonl").read_text().splitlines()
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(src[:-1]) + "\n")
    ok = read_columnar(path, allow_truncated=True)
    assert ok.truncated and ok.n == 15
    with pytest.raises(TraceError, match="truncated: no footer"):
        read_columnar(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("spec", ["lru", "belady", "lru+lookahead(depth=2, budget=2)", "lru+fiddler"])
def test_a_streamed_replay_gives_the_same_result(tmp_path: Path, spec: str) -> None:
    from sim.config import CacheConfig
    from sim.replay import replay

    path = _rich_trace(tmp_path / "t.jsonl", steps=12)
    a = replay(path, spec, CacheConfig(experts=4))
    b = replay(path, spec, CacheConfig(experts=4), stream=True)
    assert a.to_json() == b.to_json() and a.notes == b.notes


def test_canonical_lines_read_numbers_as_json_does(tmp_path: Path) -> None:
    """The regular-expression path for the writer's own lines: JSON integers as weights (`-0` is 0,
    not -0.0), exponents, long mantissas, and the ids and steps next to them, as the streaming reader
    reads them; a line it does not match (a leading zero, an integer step past 2**53) goes through
    the JSON checks and is judged alike."""
    model = toy_model(num_layers=2, num_experts=8, top_k=2)
    head = Header(model=model).model_dump_json(exclude_none=True)
    weights = ["-0", "0", "-0.0", "1", "-1", "1e5", "-1.5E-3", "0.1000000000000000055511151231257827021181583404541015625",
               "4.9406564584124654e-324", "1.7976931348623157e308", "123456789012345678901234567890"]
    lines = [head]
    for i, w in enumerate(weights):
        for layer in range(2):
            lines.append(f'{{"kind":"layer","step":{i},"phase":"decode","layer":{layer},"tokens":1,"topk":[[{i % 8},{(i + 1) % 8}]],'
                         f'"weights":[[{w},0.5]]}}')
    lines.append(f'{{"kind":"footer","steps":{len(weights)},"layer_records":{2 * len(weights)}}}')
    path = tmp_path / "canon.jsonl"
    path.write_text("\n".join(lines) + "\n")
    col = read_columnar(path, cache=False)
    want = [w for r in TraceReader(path).layer_records() for w in r.weights[0]]
    got = col.weights.ravel().tolist()
    assert got == want and [math.copysign(1, x) for x in got] == [math.copysign(1, x) for x in want]
    assert columnar_verdict(path) == stream_verdict(path)
    for bad in ('"step":01', '"step":9007199254740993', '"layer":1e0', '"tokens":1.0', '"weights":[[1e999,0.5]]'):
        key = bad.split(":")[0]
        changed = [lines[0], *(re.sub(key + r":[^,]*(?=,)", bad, x, count=1) if i == 3 else x for i, x in enumerate(lines[1:]))]
        path.write_text("\n".join(changed) + "\n")
        assert columnar_verdict(path) == stream_verdict(path), bad


@pytest.mark.parametrize(("name", "spec", "size"), [
    ("mixtral-8x7b-gsm8k.jsonl.gz", "lru", {"per_layer": 4}),
    ("mixtral-8x7b-humaneval.jsonl.gz", "belady", {"experts": 96}),
    ("zoo-coarse.jsonl.gz", "lru+lookahead(depth=2, budget=3)", {"experts": 12}),
    ("zoo-fine.jsonl.gz", "mobile(metric=importance, threshold=0.5)", {"experts": 48}),
])
def test_shipped_traces_replay_alike_from_columns_and_streamed(name: str, spec: str, size: dict[str, int]) -> None:
    """`--out` byte for byte: the cached columns (read twice: built, then from the cache) and the
    streaming reader."""
    from sim.config import CacheConfig
    from sim.replay import replay

    path = ROOT / "traces" / name
    streamed = replay(path, spec, CacheConfig(**size), stream=True).to_json()
    assert replay(path, spec, CacheConfig(**size)).to_json() == streamed
    assert replay(path, spec, CacheConfig(**size)).to_json() == streamed


def test_context_costs_replay_alike_from_columns_and_streamed(tmp_path: Path) -> None:
    """With a cost per attended position (`fit.dense_per_key_s`) the engine reads the step records'
    `seq_ids` (`sim.context`): the columns hand them over in their places, so the numbers agree."""
    from lab.hardware import HardwareProfile, load_profile
    from sim.config import CacheConfig
    from sim.replay import replay

    path = _rich_trace(tmp_path / "t.jsonl", steps=10, fields=False)
    prof = load_profile("rtx4090").model_dump()
    prof.update(name="ctx", source="calibrated")
    zero = {"fixed_s": 1e-5, "per_token_s": 1e-6, "floor_s": 0.0}
    prof["fit"] = {"model": "toy", "dense": zero, "gpu_expert": zero, "cpu_expert": zero, "dense_per_key_s": 3e-6}
    hw = HardwareProfile.model_validate(prof)
    a = replay(path, "lru", CacheConfig(experts=4), hw)
    b = replay(path, "lru", CacheConfig(experts=4), hw, stream=True)
    assert a.to_json() == b.to_json()
    plain = dict(prof, fit={**prof["fit"], "dense_per_key_s": 0.0})
    assert replay(path, "lru", CacheConfig(experts=4), HardwareProfile.model_validate(plain)).metrics["total_s"] < a.metrics["total_s"]
