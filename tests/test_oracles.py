"""The simulator against analytical results, on traces each test writes itself."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.cache import CacheConfig
from lab.hardware import load_profile
from sim.replay import replay
from traces.synthetic import cyclic_calls, iid_calls, toy_model, write_trace, zipf_probs

DEMAND = ["lru", "lfu", "fifo", "random(seed=7)"]


def _hit_rate(path: Path, policy: str, slots: int, **cache: object) -> float:
    return replay(path, policy, CacheConfig(experts=slots, **cache), "rtx4090").metrics["hit_rate"]


@pytest.mark.parametrize("policy", DEMAND)
def test_uniform_routing_hits_c_over_n(tmp_path: Path, policy: str) -> None:
    n, c = 40, 10
    path = tmp_path / "uniform.jsonl"
    write_trace(path, toy_model(num_experts=n), iid_calls([1.0] * n, 30_000, seed=1))
    assert _hit_rate(path, policy, c) == pytest.approx(c / n, abs=0.015)


def che_lru(p: np.ndarray, c: int) -> float:
    """Che's approximation: T solves sum(1 - exp(-p T)) = C; hit rate = sum p (1 - exp(-p T))."""
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-p * hi)) < c:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-p * mid)) < c else (lo, mid)
    return float(np.sum(p * (1 - np.exp(-p * lo))))


def random_fifo_irm(p: np.ndarray, c: int) -> float:
    """Exact stationary hit rate of RANDOM replacement under the IRM (Gelenbe 1973: FIFO has the same):
    P(cache = S) is proportional to prod_{i in S} p_i, so P(i cached) = p_i e_{C-1}(p without i) / e_C(p)."""

    def elem_sym(x: np.ndarray, k: int) -> float:
        e = np.zeros(k + 1)
        e[0] = 1.0
        for v in x:
            e[1:] = e[1:] + v * e[:-1]
        return float(e[k])

    ec = elem_sym(p, c)
    return float(sum(pi * pi * elem_sym(np.delete(p, i), c - 1) / ec for i, pi in enumerate(p)))


def test_lru_zipf_matches_che(tmp_path: Path) -> None:
    n, c = 100, 20
    probs = np.asarray(zipf_probs(n, 0.8))
    path = tmp_path / "zipf.jsonl"
    write_trace(path, toy_model(num_experts=n), iid_calls(probs, 60_000, seed=2))
    assert _hit_rate(path, "lru", c) == pytest.approx(che_lru(probs, c), abs=0.01)


@pytest.mark.parametrize("policy", ["fifo", "random(seed=3)"])
def test_fifo_and_random_match_irm_formula(tmp_path: Path, policy: str) -> None:
    n, c = 60, 12
    probs = np.asarray(zipf_probs(n, 0.9))
    path = tmp_path / "zipf.jsonl"
    write_trace(path, toy_model(num_experts=n), iid_calls(probs, 60_000, seed=3))
    expected = random_fifo_irm(probs, c)
    assert _hit_rate(path, policy, c) == pytest.approx(expected, abs=0.01)
    # and the formula is not LRU's: the check could fail
    assert abs(expected - che_lru(probs, c)) > 0.01


def test_cyclic_scan_belady_vs_lru_fifo(tmp_path: Path) -> None:
    n, c, calls = 10, 4, 9_000
    path = tmp_path / "cyclic.jsonl"
    write_trace(path, toy_model(num_experts=n), cyclic_calls(n, calls))
    assert _hit_rate(path, "lru", c) == 0.0
    assert _hit_rate(path, "fifo", c) == 0.0
    # after the C compulsory misses OPT hits C-1 of every n-1 accesses
    assert _hit_rate(path, "belady", c) == pytest.approx((c - 1) / (n - 1), abs=2 * c / calls)


def _pipeline_profile(tmp_path: Path, c: float, p: float, expert_bytes: int) -> Path:
    prof = load_profile("rtx4090").model_dump()
    prof.update(name="pipeline", source="calibrated")
    prof["link"].update(latency_us=c * 1e6, h2d_gbps=1e9, d2h_gbps=1e9)  # ~all of c is latency
    zero = {"fixed_s": 0.0, "per_token_s": 0.0, "floor_s": 0.0}
    prof["fit"] = {"model": "toy", "dense": zero, "gpu_expert": {**zero, "fixed_s": p}, "cpu_expert": zero}
    path = tmp_path / "pipeline.json"
    import json

    path.write_text(json.dumps(prof))
    return path


@pytest.mark.parametrize(("c", "p"), [(0.003, 0.001), (0.001, 0.003), (0.002, 0.002)])
def test_copy_compute_pipeline(tmp_path: Path, c: float, p: float) -> None:
    n = 6
    model = toy_model(num_experts=n, expert_bytes=1000)
    path = tmp_path / "one_call.jsonl"
    # one prefill-like call: n tokens, each routed to its own expert, all missing
    write_trace(path, model, [(0, [[e] for e in range(n)], [[1.0]] * n)])
    prof = _pipeline_profile(tmp_path, c, p, model.expert_bytes)
    transfer = c + 1000 / 1e18
    enough = replay(path, "lru", CacheConfig(experts=n), str(prof)).metrics
    assert enough["total_s"] == pytest.approx(min(transfer, p) + n * max(transfer, p), rel=1e-9)
    one = replay(path, "lru", CacheConfig(experts=1), str(prof)).metrics
    assert one["total_s"] == pytest.approx(n * (transfer + p), rel=1e-9)
    assert enough["misses"] == one["misses"] == n


def test_recency_inside_a_call_follows_access_order(tmp_path: Path) -> None:
    """DESIGN section 4: a call touches its experts by decreasing summed weight, ties by lower id,
    so the *lightest* expert of a call ends up the most recent. Cache of 3, one layer."""
    model = toy_model(num_experts=8, top_k=2)
    path = tmp_path / "order.jsonl"
    calls = [
        (0, [[0, 1]], [[0.3, 0.7]]),  # touches 1 then 0               LRU->MRU: 1 0
        (0, [[2, 3]], [[0.9, 0.1]]),  # 2 free slot, 3 evicts 1         0 2 3
        (0, [[1, 3]], [[0.6, 0.4]]),  # 1 evicts 0, 3 hit               2 1 3
        (0, [[5, 4]], [[0.5, 0.5]]),  # tie: 4 first; evict 2, 1        3 4 5
        (0, [[6, 3]], [[0.9, 0.1]]),  # 6 evicts 4, 3 hit               5 6 3
        (0, [[4, 3]], [[0.9, 0.1]]),  # 4 misses (a higher-id-first tie rule would keep it), 3 hit
    ]
    write_trace(path, model, calls)
    m = replay(path, "lru", CacheConfig(experts=3), "rtx4090").metrics
    assert (m["accesses"], m["hits"], m["misses"]) == (12, 3, 9)
    # heavier expert 0 in the first call: 0 is touched first, so 0 (not 1) is evicted by 3
    calls[0] = (0, [[0, 1]], [[0.7, 0.3]])
    write_trace(path, model, calls)
    m = replay(path, "lru", CacheConfig(experts=3), "rtx4090").metrics
    assert (m["accesses"], m["hits"], m["misses"]) == (12, 4, 8)


def reference_per_layer_lru(calls: list[tuple[int, list[int]]], k: int) -> tuple[int, int]:
    """A deliberately plain per-layer LRU: (hits, accesses); `calls` are (layer, experts in access order)."""
    caches: dict[int, OrderedDict[int, None]] = {}
    hits = accesses = 0
    for layer, experts in calls:
        cache = caches.setdefault(layer, OrderedDict())
        need = set(experts)
        for e in experts:
            accesses += 1
            if e in cache:
                hits += 1
            else:
                if len(cache) >= k:
                    victim = next(x for x in cache if x not in need)
                    del cache[victim]
                cache[e] = None
        for e in experts:
            cache.move_to_end(e)
    return hits, accesses


settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("ci")


@st.composite
def small_traces(draw: st.DrawFn) -> tuple[int, int, int, int, list]:
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 7))
    top_k = draw(st.integers(1, min(2, experts)))
    tokens = draw(st.integers(1, 3))
    n_calls = draw(st.integers(1, 40))
    calls = []
    for i in range(n_calls):
        rows, ws = [], []
        for _ in range(draw(st.integers(1, tokens))):
            ids = draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True))
            w = draw(st.lists(st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.7]), min_size=top_k, max_size=top_k))
            rows.append(ids)
            ws.append(w)
        calls.append((i % layers, rows, ws))
    max_distinct = max(len({e for r in rows for e in r}) for _, rows, _ in calls)
    slots = draw(st.integers(max_distinct, max_distinct + 4))
    return layers, experts, top_k, slots, calls


@given(small_traces())
def test_belady_beats_every_policy_and_counts_add_up(tmp_path_factory: pytest.TempPathFactory, case: tuple) -> None:
    layers, experts, top_k, slots, calls = case
    model = toy_model(num_layers=layers, num_experts=experts, top_k=top_k, expert_bytes=1234)
    path = tmp_path_factory.mktemp("prop") / "t.jsonl"
    write_trace(path, model, calls)
    results = {}
    for pol in ["belady", "lru", "lfu", "lfu(decay=0.5)", "fifo", "random(seed=1)", "static"]:
        m = replay(path, pol, CacheConfig(experts=slots), "rtx4090").metrics
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"]
        assert m["bytes_h2d"] == m["misses"] * model.expert_bytes
        results[pol] = m["hits"]
    assert all(results["belady"] >= h for h in results.values()), results


@given(small_traces())
def test_per_layer_lru_equals_plain_reference(tmp_path_factory: pytest.TempPathFactory, case: tuple) -> None:
    layers, experts, top_k, slots, calls = case
    model = toy_model(num_layers=layers, num_experts=experts, top_k=top_k)
    path = tmp_path_factory.mktemp("ref") / "t.jsonl"
    write_trace(path, model, calls)
    k = max(len({e for r in rows for e in r}) for _, rows, _ in calls)
    m = replay(path, "lru", CacheConfig(per_layer=k), "rtx4090").metrics

    def order(rows: list[list[int]], ws: list[list[float]]) -> list[int]:
        mass: dict[int, float] = {}
        for r, w in zip(rows, ws, strict=True):
            for e, x in zip(r, w, strict=True):
                mass[e] = mass.get(e, 0.0) + x
        return sorted(mass, key=lambda e: (-mass[e], e))

    hits, accesses = reference_per_layer_lru([(layer, order(rows, ws)) for layer, rows, ws in calls], k)
    assert (m["hits"], m["accesses"]) == (hits, accesses)


def test_che_formula_sanity() -> None:
    # the oracle itself: a cache of all N keys hits always, of none never
    p = np.asarray(zipf_probs(10, 1.0))
    assert che_lru(p, 10) > 0.99
    assert math.isclose(random_fifo_irm(p, 10), 1.0)
