"""`sim.curves` against `sim.replay`: the curves must equal replay's hit counts at every size they give.

Small synthetic traces (multi-token calls, several layers, tied weights) are checked at every size
against the policies run without a clock (`simulate_hits`, many examples) and against the full replay
(fewer examples); the shipped GSM8K trace at the sizes the benchmarks use. The properties the stack
algorithms rest on (inclusion: LRU monotone; Belady optimal: OPT >= LRU) hold from the largest call
up; below it the simulator's forced slot reuse breaks both, which two pinned examples show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from curves_reference import _opt_depths_walk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.cache import CacheConfig
from lab.hardware import load_profile
from sim.curves import (
    NEVER,
    Calls,
    calls_from_records,
    compute_curves,
    count_less,
    curves,
    lru_depths,
    main,
    opt_depths,
    read_calls,
    simulate_hits,
)
from sim.replay import replay
from traces.schema import LayerRecord
from traces.synthetic import iid_calls, toy_model, write_trace

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz"
HUMANEVAL = ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz"
HW = load_profile("rtx4090")
PARTITIONS = ["global", "per_layer"]

Call = tuple[int, list[list[int]], list[list[float]]]


def cache_of(partition: str, size: int) -> CacheConfig:
    return CacheConfig(per_layer=size) if partition == "per_layer" else CacheConfig(experts=size)


def replay_hits(path: Path, policy: str, partition: str, size: int) -> int:
    m = replay(path, policy, cache_of(partition, size), HW).metrics
    assert m["inflight_hits"] == 0  # demand policies: every copy lands before the next call plans
    return m["hits"]


@st.composite
def traces(draw: st.DrawFn, max_calls: int = 24) -> tuple[int, int, int, list[Call]]:
    """(layers, experts, top_k, calls): calls of 1-3 tokens, weights from a small set (ties happen)."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 5))
    top_k = draw(st.integers(1, min(2, experts)))
    calls: list[Call] = []
    for _ in range(draw(st.integers(1, max_calls))):
        layer = draw(st.integers(0, layers - 1))
        tokens = draw(st.integers(1, 3))
        rows = [draw(st.permutations(range(experts)))[:top_k] for _ in range(tokens)]
        weights = [[draw(st.sampled_from([0.1, 0.25, 0.5, 0.75])) for _ in range(top_k)] for _ in range(tokens)]
        calls.append((layer, rows, weights))
    return layers, experts, top_k, calls


def records(calls: list[Call]) -> list[LayerRecord]:
    return [
        LayerRecord(step=i, phase="decode", layer=layer, tokens=len(rows), topk=rows, weights=w)
        for i, (layer, rows, w) in enumerate(calls)
    ]


def ordered_calls(experts: int, top_k: int, calls: list[list[int]], layers: list[int] | None = None) -> list[Call]:
    """Calls given by their experts in access order: one token per top_k experts, weights falling."""
    out: list[Call] = []
    for i, order in enumerate(calls):
        rows = [order[j : j + top_k] for j in range(0, len(order), top_k)]
        assert all(len(r) == top_k for r in rows)
        n = len(order)
        w = [[float(n - j - t) for t in range(top_k)] for j in range(0, n, top_k)]
        out.append((layers[i] if layers else 0, rows, w))
    return out


# -- the dominance count --------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=40), st.lists(st.tuples(st.integers(0, 45), st.integers(0, 45)), max_size=20))
def test_count_less_is_a_dominance_count(values: list[int], queries: list[tuple[int, int]]) -> None:
    v = np.asarray(values, dtype=np.int64)
    ends = np.asarray([min(e, len(values)) for e, _ in queries], dtype=np.int64)
    bounds = np.asarray([b for _, b in queries], dtype=np.int64)
    got = count_less(v, ends, bounds).tolist()
    assert got == [sum(1 for x in values[:e] if x < b) for e, b in zip(ends.tolist(), bounds.tolist(), strict=True)]


# -- exactness ---------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(traces())
def test_curves_equal_the_policies_at_every_size(tr: tuple[int, int, int, list[Call]]) -> None:
    layers, experts, top_k, calls = tr
    c = calls_from_records(toy_model(num_layers=layers, num_experts=experts, top_k=top_k), records(calls))
    for partition in PARTITIONS:
        res = compute_curves(c, partition)  # type: ignore[arg-type]
        assert res.sizes == list(range(top_k, res.sizes[-1] + 1))
        for size, lru, opt in zip(res.sizes, res.lru, res.opt, strict=True):
            cfg = cache_of(partition, size)
            assert (lru, opt) == (simulate_hits(c, "lru", cfg), simulate_hits(c, "belady", cfg)), (partition, size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traces(max_calls=16))
def test_curves_equal_replay_at_every_size(tmp_path: Path, tr: tuple[int, int, int, list[Call]]) -> None:
    layers, experts, top_k, calls = tr
    path = tmp_path / "t.jsonl"
    write_trace(path, toy_model(num_layers=layers, num_experts=experts, top_k=top_k), calls)
    for partition in PARTITIONS:
        res = curves(path, partition)  # type: ignore[arg-type]
        for row in res.rows():
            size = row["size"]
            assert row["lru"]["hits"] == replay_hits(path, "lru", partition, size), (partition, size, row["method"])
            assert row["opt"]["hits"] == replay_hits(path, "belady", partition, size), (partition, size, row["method"])


# -- OPT depths: the level-by-level computation against the call-by-call walk ---------------------------
def make_calls(layers: int, experts: int, calls: list[tuple[int, list[int]]]) -> Calls:
    """Calls given directly: (layer, distinct experts in access order) each, any order and any size."""
    model = toy_model(num_layers=layers, num_experts=experts, top_k=1)
    keys = [layer * experts + e for layer, order in calls for e in order]
    starts = np.zeros(len(calls) + 1, dtype=np.int64)
    np.cumsum([len(order) for _, order in calls], out=starts[1:])
    lay = np.asarray([layer for layer, _ in calls], dtype=np.int64)
    return Calls(model, np.asarray(keys, dtype=np.int64), starts, lay, np.arange(len(calls), dtype=np.int64))


@st.composite
def raw_calls(draw: st.DrawFn, max_calls: int = 60) -> Calls:
    """Calls of 1 to all experts of a layer in any order: most of one size (decode), one in `odd` of
    any size (a prefill call among them: rare ones are wider than the carries most calls keep), few
    experts (deep reuse) or many (keys that never come back)."""
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 10))
    usual = draw(st.integers(1, experts))  # the size most calls keep to
    odd = draw(st.sampled_from([1, 2, 8, 30]))
    calls = []
    for _ in range(draw(st.integers(0, max_calls))):
        m = draw(st.integers(1, experts)) if draw(st.integers(1, odd)) == 1 else usual
        calls.append((draw(st.integers(0, layers - 1)), draw(st.permutations(range(experts)))[:m]))
    return make_calls(layers, experts, calls)


@settings(max_examples=400, deadline=None)
@given(raw_calls())
def test_opt_depths_equal_the_walk(c: Calls) -> None:
    """Every depth, not just the curve: first accesses `NEVER`, and the same level for every reuse."""
    for partition in PARTITIONS:
        assert np.array_equal(opt_depths(c, partition), _opt_depths_walk(c, partition)), partition  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "calls",
    [
        [],  # no accesses
        [(0, [0])],  # one access
        [(0, [2, 0, 1])] * 5,  # the same call again and again: the stack never moves
        [(0, [0, 1, 2, 3, 4, 5])] + [(0, [j % 6, (j + 2) % 6]) for j in range(20)] + [(0, [5, 4, 3, 2, 1, 0])],
        [(0, [j % 7]) for j in range(30)] + [(0, list(range(7)))],  # a cyclic scan, then a call needing all
        [(j % 3, [(j * 5) % 4, (j * 3 + 1) % 4]) for j in range(40)],  # three layers, two keys a call
        [(0, [0, 1]), (1, [0]), (0, [2, 3, 0]), (1, [1, 0]), (0, [1]), (1, [2, 1, 0])],
        # decode calls of two keys and one prefill call of seven: it keeps carries past the usual two
        [(j % 2, [(3 * j) % 9, (3 * j + 4) % 9]) for j in range(30)]
        + [(1, [8, 0, 7, 1, 6, 2, 5])]
        + [(j % 2, [(5 * j) % 9, (5 * j + 2) % 9]) for j in range(30)],
    ],
)
def test_opt_depths_edge_cases(calls: list[tuple[int, list[int]]]) -> None:
    layers = 1 + max((layer for layer, _ in calls), default=0)
    experts = 1 + max((e for _, order in calls for e in order), default=0)
    c = make_calls(layers, experts, calls)
    for partition in PARTITIONS:
        assert np.array_equal(opt_depths(c, partition), _opt_depths_walk(c, partition)), partition  # type: ignore[arg-type]


def test_opt_depths_on_a_long_trace_use_wide_ints() -> None:
    """50,000 one-key calls: ranks times restarts no longer fit 32 bits, so the levels run in int64."""
    rng = np.random.default_rng(7)
    c = make_calls(1, 9, [(0, [int(e)]) for e in rng.zipf(1.6, 50_000) % 9])
    assert (c.n_calls + 2) * (c.accesses + 2) >= 2**31
    assert np.array_equal(opt_depths(c, "global"), _opt_depths_walk(c, "global"))


@pytest.mark.parametrize("path", [GSM8K, HUMANEVAL], ids=["gsm8k", "humaneval"])
def test_opt_depths_equal_the_walk_on_the_shipped_traces(path: Path) -> None:
    c = read_calls(path)
    for partition in PARTITIONS:
        assert np.array_equal(opt_depths(c, partition), _opt_depths_walk(c, partition)), partition  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gsm8k() -> dict[str, dict[int, dict]]:
    return {p: {r["size"]: r for r in curves(GSM8K, p).rows()} for p in PARTITIONS}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("partition", "size"), [("per_layer", k) for k in range(2, 9)] + [("global", c) for c in range(16, 257, 16)]
)
def test_gsm8k_curves_equal_replay(gsm8k: dict[str, dict[int, dict]], partition: str, size: int) -> None:
    row = gsm8k[partition][size]
    assert row["method"] == "stack"  # every call of a decode trace has top_k = 2 distinct experts
    assert row["lru"]["hits"] == replay_hits(GSM8K, "lru", partition, size)
    assert row["opt"]["hits"] == replay_hits(GSM8K, "belady", partition, size)


def test_gsm8k_curves_match_the_published_comparison(gsm8k: dict[str, dict[int, dict]]) -> None:
    """The per-layer figures of docs/benchmarks.md (from sim.replay), read off the curves."""
    rate = {k: (round(r["lru"]["hit_rate"], 3), round(r["opt"]["hit_rate"], 3)) for k, r in gsm8k["per_layer"].items()}
    assert rate[2] == (0.342, 0.342) and rate[3] == (0.473, 0.587) and rate[4] == (0.601, 0.732)
    assert gsm8k["global"][256]["lru"]["hits"] == gsm8k["global"][256]["opt"]["hits"] == 15778 - 256


# -- properties -------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(traces(max_calls=40))
def test_lru_monotone_and_opt_above_lru_from_the_largest_call(tr: tuple[int, int, int, list[Call]]) -> None:
    layers, experts, top_k, calls = tr
    c = calls_from_records(toy_model(num_layers=layers, num_experts=experts, top_k=top_k), records(calls))
    for partition in PARTITIONS:
        res = compute_curves(c, partition)  # type: ignore[arg-type]
        bound = c.accesses - res.distinct
        stack = [(lru, opt) for s, m, lru, opt in zip(res.sizes, res.methods, res.lru, res.opt, strict=True) if m == "stack"]
        assert all(m == "stack" for s, m in zip(res.sizes, res.methods, strict=True) if s >= res.largest_call)
        lru = [x for x, _ in stack]
        assert lru == sorted(lru)  # inclusion
        assert all(opt >= x for x, opt in stack)  # Belady is optimal there
        assert all(opt <= bound and x <= bound for x, opt in zip(res.lru, res.opt, strict=True))  # compulsory misses
        assert res.lru[-1] == res.opt[-1] == bound  # the last size holds every key: only first accesses miss


def _pinned(tmp_path: Path, experts: int, order: list[list[int]]) -> Path:
    path = tmp_path / "pinned.jsonl"
    write_trace(path, toy_model(num_layers=1, num_experts=experts, top_k=1), ordered_calls(experts, 1, order))
    return path


def test_below_the_largest_call_lru_is_not_monotone(tmp_path: Path) -> None:
    """With 3 slots, the 4-expert call streams through the cache and evicts its own expert 1 (its least
    recent hit), which the next call needs; with 2 slots the call keeps its last loads, 3 and 1."""
    path = _pinned(tmp_path, 4, [[1, 0, 2], [3, 0, 1, 2], [1], [3]])
    res = curves(path, "global")
    by = {r["size"]: r for r in res.rows()}
    assert res.largest_call == 4 and by[2]["method"] == by[3]["method"] == "simulated"
    assert (by[2]["lru"]["hits"], by[3]["lru"]["hits"]) == (4, 3)
    assert (replay_hits(path, "lru", "global", 2), replay_hits(path, "lru", "global", 3)) == (4, 3)


def test_below_the_largest_call_belady_can_lose_to_lru(tmp_path: Path) -> None:
    path = _pinned(tmp_path, 4, [[1, 2], [3], [1, 3, 0], [1, 0, 3, 2], [0, 3, 2], [2]])
    by = {r["size"]: r for r in curves(path, "global").rows()}
    assert (by[2]["lru"]["hits"], by[2]["opt"]["hits"]) == (6, 5)
    assert (replay_hits(path, "lru", "global", 2), replay_hits(path, "belady", "global", 2)) == (6, 5)


def test_stack_only_starts_at_the_largest_call(tmp_path: Path) -> None:
    path = _pinned(tmp_path, 4, [[1, 0, 2], [3, 0, 1, 2], [1], [3]])
    res = curves(path, "global", stack_only=True)
    assert res.sizes == [4] and res.methods == ["stack"]
    assert any("left out" in n for n in res.notes)


def test_depths_of_a_cyclic_scan() -> None:
    """0,1,2,0,1,2,...: LRU depth 2 every time (a miss below 3 slots); OPT keeps the soonest."""
    model = toy_model(num_layers=1, num_experts=3, top_k=1)
    keys = np.array([0, 1, 2] * 4, dtype=np.int64)
    c = Calls(model, keys, np.arange(13, dtype=np.int64), np.zeros(12, dtype=np.int64), np.arange(12, dtype=np.int64))
    res = compute_curves(c, "global")
    assert res.sizes == [1, 2, 3] and res.lru == [0, 0, 9]
    assert res.opt[1] > 0

    d = lru_depths(c, "global")
    assert (d[:3] == NEVER).all() and (d[3:] == 2).all()


def test_empty_trace(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    write_trace(path, toy_model(num_layers=2, num_experts=4, top_k=2), [])
    res = curves(path, "per_layer")
    assert res.calls.accesses == 0 and res.sizes == [2] and res.lru == res.opt == [0]
    assert res.compulsory_max_hit_rate == 0.0


# -- the command line ------------------------------------------------------------------------------
def small_trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    write_trace(path, toy_model(num_layers=2, num_experts=6, top_k=2), iid_calls([1.0] * 6, 80, num_layers=2, top_k=2, seed=4))
    return path


def test_cli_writes_json_html_and_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = small_trace(tmp_path)
    out1, out2, html = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.html"
    assert main([str(path), "--partition", "per_layer", "--out", str(out1), "--html", str(html)]) == 0
    assert main([str(path), "--partition", "per_layer", "--out", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()  # deterministic
    data = json.loads(out1.read_text())
    assert json.dumps(data, indent=2, sort_keys=True) + "\n" == out1.read_text()
    assert data["partition"] == "per_layer" and data["accesses"] == 160 and data["compulsory"]["misses"] == 12
    row = data["curves"][0]
    assert row["size"] == 2 and set(row["lru"]) == {"hits", "accesses", "hit_rate"}
    assert row["lru"]["hit_rate"] == row["lru"]["hits"] / 160
    text = html.read_text()
    assert "Belady (OPT)" in text and "compulsory-miss bound" in text
    assert "<script src=" not in text and "plotly" in text.lower()  # plotly.js inlined
    table = capsys.readouterr().out
    assert "size" in table and "LRU" in table and "OPT" in table and f"wrote {out1}" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.jsonl"], "no such file"),
        (["{trace}", "--max-slots", "1"], "below top_k=2"),
        (["{trace}", "--max-slots", "0"], "at least 1"),
        (["{trace}", "--partition", "sideways"], "invalid choice"),
        (["{cut}"], "truncated"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    path = small_trace(tmp_path)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # no footer
    argv = [a.format(trace=path, cut=cut) if a != "missing.jsonl" else str(tmp_path / a) for a in args]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_cli_allow_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = small_trace(tmp_path)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    assert main([str(cut), "--allow-truncated"]) == 0
    assert "truncated" in capsys.readouterr().out

