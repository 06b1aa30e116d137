"""The policies lookahead, moe-infinity, fiddler and adaptive-k: what each decides, properties on
random traces, and the same decisions in the simulator and the runtime."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.cache import CacheConfig
from lab.hardware import load_profile
from policies import (
    ComputeCost,
    CostModel,
    Counters,
    ExpertCache,
    LayerRequest,
    Policy,
    PolicySpecError,
    apply_plan,
    make_policy,
)
from sim.engine import Timeline
from sim.replay import ReplayError, replay
from traces.io import TraceWriter
from traces.schema import Fields, Header, LayerRecord, ModelSpec, Recording, StepRecord
from traces.synthetic import toy_model

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz"
EB = 1000  # expert bytes of the toy models

settings.register_profile("policies-a", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])

Rows = tuple[list[list[int]], list[list[float]]]
Step = tuple[str, list[Rows]]  # (phase, one (topk rows, weight rows) per MoE layer)


# -- helpers ----------------------------------------------------------------------------------------
def write_steps(path: Path, model: ModelSpec, steps: list[Step], lookahead: int = 0,
                look_rows: dict[tuple[int, int], list[list[int]]] | None = None) -> Path:
    """A trace of whole steps (every MoE layer in order). With `lookahead` = d each layer record
    carries the true routing of layers l+1..l+d (a perfect look-ahead) unless `look_rows` gives
    another guess for (step, target layer)."""
    header = Header(model=model, recording=Recording(prompt_source="test"), fields=Fields(lookahead=lookahead > 0))
    L = model.num_moe_layers
    with TraceWriter(path, header) as w:
        for s, (phase, layers) in enumerate(steps):
            for layer, (rows, ws) in enumerate(layers):
                look = None
                if lookahead:
                    look = {str(x): (look_rows or {}).get((s, x), layers[x][0]) for x in range(layer + 1, min(layer + lookahead, L - 1) + 1)}
                w.write(LayerRecord(step=s, phase=phase, layer=layer, tokens=len(rows), topk=rows, weights=ws, lookahead=look))
            w.write(StepRecord(step=s, phase=phase, seq_ids=[0]))
    return path


def random_steps(rng: random.Random, layers: int, experts: int, top_k: int, n_steps: int, prefill_every: int = 0,
                 prefill_tokens: int = 4, skew: float = 1.2) -> list[Step]:
    """Zipf-skewed routing, a prefill step of `prefill_tokens` rows every `prefill_every` steps."""
    weights_e = [1.0 / (i + 1) ** skew for i in range(experts)]
    steps: list[Step] = []
    for s in range(n_steps):
        prefill = prefill_every > 0 and s % prefill_every == 0
        tokens = prefill_tokens if prefill else 1
        calls: list[Rows] = []
        for layer in range(layers):
            perm = list(range(experts))
            random.Random(layer).shuffle(perm)  # a fixed popularity order per layer
            rows, ws = [], []
            for _ in range(tokens):
                ids: list[int] = []
                while len(ids) < top_k:
                    e = perm[rng.choices(range(experts), weights_e)[0]]
                    if e not in ids:
                        ids.append(e)
                raw = sorted((rng.random() + 0.05 for _ in ids), reverse=True)
                rows.append(ids)
                ws.append([x / sum(raw) for x in raw])
            calls.append((rows, ws))
        steps.append(("prefill" if prefill else "decode", calls))
    return steps


def profile_file(tmp: Path, model: str, *, latency: float, dense: float, gpu: float, cpu_fixed: float,
                 cpu_per_token: float, name: str = "test-profile") -> str:
    """A calibrated-style profile with chosen costs: transfer = latency (bandwidth huge), the dense
    part of a layer, one GPU expert, and a CPU expert = cpu_fixed + cpu_per_token * n."""
    prof = load_profile("rtx4090").model_dump()
    prof.update(name=name, source="calibrated")
    prof["link"].update(latency_us=latency * 1e6, h2d_gbps=1e9, d2h_gbps=1e9)
    zero = {"fixed_s": 0.0, "per_token_s": 0.0, "floor_s": 0.0}
    prof["fit"] = {"model": model, "dense": {**zero, "fixed_s": dense}, "gpu_expert": {**zero, "fixed_s": gpu},
                   "cpu_expert": {**zero, "fixed_s": cpu_fixed, "per_token_s": cpu_per_token}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(prof))
    return str(path)


def costs(transfer: float = 1.5e-4, gpu: float = 0.0, cpu_fixed: float = 0.0, cpu_per_token: float = 1e-4) -> CostModel:
    return CostModel(transfer, 1e30, {"full": EB}, ComputeCost(), ComputeCost(gpu), ComputeCost(cpu_fixed, cpu_per_token))


def drive(pol: Policy, cache: ExpertCache, reqs: list[LayerRequest]) -> list:
    """Plan and apply each request in turn (no engine: every copy lands at once)."""
    plans = []
    counters = Counters()
    for r in reqs:
        plan = pol.plan(r, cache)
        apply_plan(cache, r, plan, counters, {"full": EB})
        for k in list(cache.inflight):
            cache.complete(k)
        plans.append(plan)
    return plans


def req(step: int, layer: int, rows: list[list[int]], ws: list[list[float]] | None = None, phase: str = "decode",
        lookahead: dict[int, list[list[int]]] | None = None) -> LayerRequest:
    ws = ws if ws is not None else [[1.0 / len(r)] * len(r) for r in rows]
    look = None if lookahead is None else {k: np.array(v) for k, v in lookahead.items()}
    return LayerRequest(step, phase, layer, np.array(rows), np.array(ws), lookahead=look)  # type: ignore[arg-type]


def metrics(path: Path, spec: str, cache: CacheConfig, hardware: str = "rtx4090") -> dict:
    return replay(path, spec, cache, hardware).metrics


# -- specs and parameters ---------------------------------------------------------------------------
def test_specs_parameters_and_composition() -> None:
    assert make_policy("lru+lookahead(depth=1,budget=2)").spec == "lru+lookahead(depth=1, budget=2, predictor=auto)"
    assert make_policy("lookahead").spec == "lru+lookahead(depth=1, budget=2, predictor=auto)"  # a modifier alone wraps lru
    assert make_policy("fiddler").spec == "lru+fiddler"
    assert make_policy("adaptive-k(threshold=0.2)").spec == "lru+adaptive-k(threshold=0.2, renormalize=True)"
    assert make_policy("moe-infinity").spec == "moe-infinity(capacity=16, budget=2, window=0)"
    spec = make_policy("lfu(decay=0.9)+adaptive-k(threshold=0.3)+fiddler+lookahead(depth=2)").spec
    assert make_policy(spec).spec == spec  # the canonical spec parses back to itself
    look = make_policy("lru+lookahead(depth=3)")
    assert look.uses == {"lookahead"} and look.lookahead_depth == 3 and look.required_fields() == set()
    assert make_policy("lru+lookahead(predictor=lookahead)").required_fields() == {"lookahead"}
    hist = make_policy("lru+lookahead(predictor=history)")  # the runtime computes no look-ahead for it
    assert hist.uses == frozenset() and hist.lookahead_depth == 0
    outer = make_policy("lru+lookahead(depth=2)+fiddler")  # a modifier forwards what its base needs
    assert outer.uses == {"lookahead"} and outer.lookahead_depth == 2
    assert not make_policy("adaptive-k+fiddler").lossless and make_policy("lru+fiddler+lookahead").lossless


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("lookahead(depth=0)", "depth"), ("lookahead(depth=17)", "depth"), ("lookahead(budget=-1)", "budget"),
     ("lookahead(predictor=oracle)", "predictor"), ("moe-infinity(capacity=0)", "capacity"),
     ("moe-infinity(budget=-2)", "budget"), ("moe-infinity(window=-1)", "window"), ("moe-infinity(depth=1)", "no parameter"),
     ("adaptive-k(threshold=1.5)", "threshold"), ("adaptive-k(threshold=-0.1)", "threshold"),
     ("adaptive-k(renormalize=maybe)", "renormalize"), ("fiddler(margin=2)", "no parameter"),
     ("moe-infinity+lru", "only modifiers"), ("lookahead+moe-infinity", "only modifiers")],
)
def test_bad_parameters_are_one_clear_error(spec: str, fragment: str) -> None:
    with pytest.raises(PolicySpecError, match=fragment):
        make_policy(spec)


def test_replay_refuses_a_strict_lookahead_without_the_field(tmp_path: Path) -> None:
    model = toy_model(num_layers=2, num_experts=4, top_k=1, expert_bytes=EB)
    path = write_steps(tmp_path / "t.jsonl", model, random_steps(random.Random(0), 2, 4, 1, 3))
    with pytest.raises(ReplayError, match="lookahead"):
        replay(path, "lru+lookahead(predictor=lookahead)", CacheConfig(experts=2))
    replay(path, "lru+lookahead", CacheConfig(experts=2))  # auto: the history fallback


# -- lookahead --------------------------------------------------------------------------------------
def test_lookahead_prefetches_what_the_lookahead_predicts() -> None:
    model = toy_model(num_layers=3, num_experts=8, top_k=2, expert_bytes=EB)
    cache = ExpertCache(5, 3, "global")
    pol = make_policy("lru+lookahead(depth=2, budget=3)")
    pol.reset(model, cache, None)
    (plan,) = drive(pol, cache, [req(0, 0, [[1, 2]], [[0.6, 0.4]], lookahead={1: [[5, 3]], 2: [[7, 6]]})])
    # nearer layer first, each layer's experts in the router's order; the budget cuts the rest
    assert [ld.key for ld in plan.prefetch] == [(1, 5), (1, 3), (2, 7)]
    assert pol.predictions == {"lookahead": 2, "history": 0} and pol.predictor_used == "lookahead"  # type: ignore[attr-defined]
    # a resident prediction is not copied again, nor evicted for another prefetch: LRU alone would
    # evict (2, 7), the least recent key the call does not use
    (plan,) = drive(pol, cache, [req(0, 1, [[5, 3]], lookahead={2: [[7, 4]]})])
    assert not plan.loads and [(ld.key, ld.victim) for ld in plan.prefetch] == [((2, 4), (0, 1))]
    assert pol.notes() == []


def test_lookahead_falls_back_to_history_and_says_so() -> None:
    model = toy_model(num_layers=2, num_experts=8, top_k=2, expert_bytes=EB)
    cache = ExpertCache(4, 2, "global")
    pol = make_policy("lru+lookahead")
    pol.reset(model, cache, None)
    (plan,) = drive(pol, cache, [req(0, 0, [[0, 1]])])
    assert not plan.prefetch  # layer 1 has no previous call yet
    drive(pol, cache, [req(0, 1, [[6, 4]], [[0.5, 0.5]])])
    cache.evict((1, 4))  # as if other layers had needed the slots
    cache.evict((1, 6))
    (plan,) = drive(pol, cache, [req(1, 0, [[0, 1]])])
    # step 1 layer 0: the prediction for layer 1 is its previous call's experts, in its access order
    assert not plan.loads and [ld.key for ld in plan.prefetch] == [(1, 4), (1, 6)]
    assert pol.predictor_used == "history"  # type: ignore[attr-defined]
    assert pol.notes() and "history" in pol.notes()[0]


@pytest.mark.parametrize("spec", ["lru+lookahead(depth=1, budget=2)", "lru+lookahead(depth=2, budget=4)"])
def test_perfect_lookahead_with_enough_bandwidth_never_stalls_after_the_first_step(tmp_path: Path, spec: str) -> None:
    """Layer 0 always routes to experts 0 and 1 (so from step 1 on it hits: nothing predicts layer
    0), the other layers at random; the trace's look-ahead is the true routing. A copy (0.1 ms) is
    much shorter than a layer (1 ms dense + 2 x 0.1 ms experts), the cache holds top_k per layer:
    every prefetch lands before its layer runs, so no step after the first waits for a copy.
    Demand LRU on the same trace and hardware does stall."""
    L, E, k = 4, 8, 2
    model = toy_model(num_layers=L, num_experts=E, top_k=k, expert_bytes=EB)
    steps = random_steps(random.Random(3), L, E, k, 40)
    for _, calls in steps:
        calls[0] = ([[0, 1]], [[0.6, 0.4]])
    path = write_steps(tmp_path / "perfect.jsonl", model, steps, lookahead=2)
    hw = profile_file(tmp_path, "toy", latency=1e-4, dense=1e-3, gpu=1e-4, cpu_fixed=1e-3, cpu_per_token=0.0)
    stalls = {}
    for pol in (spec, "lru"):
        tl = Timeline(max_steps=10**6, first_step=1)
        res = replay(path, pol, CacheConfig(per_layer=k), hw, timeline=tl)
        stalls[pol] = [iv for iv in tl.intervals if iv.label.startswith("stall")]
        if pol == spec:
            m = res.metrics
            assert m["prefetches"] > 0 and m["misses"] <= 2 * k  # the cold layer 0 and layer 1 of step 0
            assert m["stall_s"] > 0  # step 0: layer 0's experts are copied on demand
    assert stalls[spec] == []
    assert stalls["lru"]


# -- moe-infinity -----------------------------------------------------------------------------------
def _seq(pol: Policy, cache: ExpertCache, step: int, phase: str, layers: list[list[list[int]]]) -> list:
    return drive(pol, cache, [req(step, layer, rows, phase=phase) for layer, rows in enumerate(layers)])


def test_moe_infinity_prefetches_the_best_matching_sequence_by_score() -> None:
    model = toy_model(num_layers=3, num_experts=4, top_k=1, expert_bytes=EB)
    cache = ExpertCache(6, 3, "global")
    pol = make_policy("moe-infinity(budget=2)")
    pol.reset(model, cache, None)
    # sequence A: a prefill of 3 tokens and one decode step
    _seq(pol, cache, 0, "prefill", [[[0], [0], [0]], [[1], [2], [3]], [[2], [2], [3]]])
    _seq(pol, cache, 1, "decode", [[[0]], [[1]], [[2]]])
    assert pol.collection == []  # type: ignore[attr-defined]
    # sequence B starts with a prefill: A joins the collection. B's layer 0 matches A (cosine 1)
    for k in list(cache.resident):
        cache.evict(k)
    (plan,) = drive(pol, cache, [req(2, 0, [[0]], phase="prefill")])
    assert len(pol.collection) == 1 and pol.sequences == 2  # type: ignore[attr-defined]
    # scores M[x, e] * (1 - (x - l) / (L + 1)), A's counts: (1,1): 2 * 3/4 = 1.5, (2,2): 3 * 2/4 = 1.5,
    # (1,2) and (1,3): 0.75, (2,3): 0.5; ties: the nearer layer first
    assert [ld.key for ld in plan.prefetch] == [(1, 1), (2, 2)]
    # a decode step, then a new sequence whose layer 0 uses expert 3, which no stored sequence used
    # there: nothing matches, no prefetch
    drive(pol, cache, [req(3, 0, [[0]])])
    (plan,) = drive(pol, cache, [req(4, 0, [[3]], phase="prefill")])
    assert pol.sequences == 3 and len(pol.collection) == 2 and not plan.prefetch  # type: ignore[attr-defined]


def test_moe_infinity_evicts_by_frequency_times_layer_decay() -> None:
    model = toy_model(num_layers=2, num_experts=4, top_k=1, expert_bytes=EB)
    cache = ExpertCache(2, 2, "global")
    pol = make_policy("moe-infinity")
    pol.reset(model, cache, None)
    (p0,) = drive(pol, cache, [req(0, 0, [[0], [0], [1]], phase="prefill")])
    assert [k for k in p0.execute] == [(0, 0), (0, 1)]  # touch order: (0, 1) is the most recent
    (p1,) = drive(pol, cache, [req(0, 1, [[2], [2], [2]], phase="prefill")])
    # priority (0,0) = 2/3 * 1 > (0,1) = 1/3 * 1: (0,1) goes although LRU would evict (0,0)
    assert [ld.victim for ld in p1.loads] == [(0, 1)]
    (p2,) = drive(pol, cache, [req(1, 0, [[1]])])
    # now (0,0) = 2/4 * 1 = 0.5 < (1,2) = 3/3 * (1 - 1/3) = 0.67
    assert [ld.victim for ld in p2.loads] == [(0, 0)]


def test_moe_infinity_sequences_and_bounded_collection() -> None:
    model = toy_model(num_layers=1, num_experts=4, top_k=1, expert_bytes=EB)
    cache = ExpertCache(2, 1, "global")
    pol = make_policy("moe-infinity(capacity=2)")
    pol.reset(model, cache, None)
    # prefill, prefill (one prompt's chunks), decode | prefill, decode | prefill | prefill (a new sequence after...)
    pattern = [("prefill", 0), ("prefill", 0), ("decode", 0), ("prefill", 1), ("decode", 1), ("prefill", 0), ("decode", 0),
               ("prefill", 2), ("decode", 2)]
    for s, (phase, e) in enumerate(pattern):
        drive(pol, cache, [req(s, 0, [[e]], phase=phase)])
    assert pol.sequences == 4  # type: ignore[attr-defined]
    # the collection held [seq e0, seq e1]; the third (e0 again) replaced the most similar: the first
    assert [int(np.argmax(m[0])) for m in pol.collection] == [1, 0]  # type: ignore[attr-defined]
    win = make_policy("moe-infinity(window=2)")
    c2 = ExpertCache(2, 1, "global")
    win.reset(model, c2, None)
    for s in range(5):  # decode only: a new sequence every 2 decode steps
        drive(win, c2, [req(s, 0, [[s % 2]])])
    assert win.sequences == 3 and len(win.collection) == 2  # type: ignore[attr-defined]


# -- fiddler ----------------------------------------------------------------------------------------
def test_fiddler_needs_a_cost_model() -> None:
    model = toy_model(num_layers=1, num_experts=4, top_k=1, expert_bytes=EB)
    with pytest.raises(PolicySpecError, match="cost model"):
        make_policy("lru+fiddler").reset(model, ExpertCache(2, 1, "global"), None)
    link_only = CostModel(1e-5, 1e9, {"full": EB}, ComputeCost(), ComputeCost(), ComputeCost())  # the runtime's default
    with pytest.raises(PolicySpecError, match="cost model"):
        make_policy("fiddler").reset(model, ExpertCache(2, 1, "global"), link_only)


def test_fiddler_runs_a_miss_on_the_cpu_when_that_is_cheaper() -> None:
    model = toy_model(num_layers=1, num_experts=8, top_k=1, expert_bytes=EB)
    cache = ExpertCache(2, 1, "global")
    pol = make_policy("lru+fiddler")
    pol.reset(model, cache, costs())  # CPU 0.1 ms per token, copy 0.15 ms: CPU for 1 token, GPU for 2
    r = req(0, 0, [[3], [3], [5]])
    (plan,) = drive(pol, cache, [r])
    assert plan.execute == [(0, 3)] and [ld.key for ld in plan.loads] == [(0, 3)] and list(plan.cpu) == [(0, 5)]
    assert (0, 5) not in cache and (0, 3) in cache
    (plan,) = drive(pol, cache, [req(1, 0, [[3]])])  # a hit stays on the GPU
    assert plan.execute == [(0, 3)] and not plan.cpu and not plan.loads


def test_fiddler_hands_a_streamed_slot_on() -> None:
    """One slot, a call of three experts: X (3 rows), Y (1 row, heavy), Z (3 rows). LRU streams them
    X -> Y -> Z through the slot; Y moves to the CPU, so Z takes the slot after X."""
    model = toy_model(num_layers=1, num_experts=8, top_k=1, expert_bytes=EB)
    cache = ExpertCache(1, 1, "global")
    pol = make_policy("lru+fiddler")
    pol.reset(model, cache, costs())
    r = req(0, 0, [[1], [1], [1], [2], [3], [3], [3]], [[1.0]] * 3 + [[2.5]] + [[0.5]] * 3)
    assert r.experts_in_access_order() == [1, 2, 3]
    (plan,) = drive(pol, cache, [r])
    assert [(ld.key, ld.victim) for ld in plan.loads] == [((0, 1), None), ((0, 3), (0, 1))]
    assert list(plan.cpu) == [(0, 2)] and plan.order == [(0, 1), (0, 3)]


# -- adaptive-k -------------------------------------------------------------------------------------
def test_adaptive_k_drops_weak_second_experts_and_orders_by_executed_weights() -> None:
    model = toy_model(num_layers=1, num_experts=8, top_k=2, expert_bytes=EB)
    cache = ExpertCache(4, 1, "global")
    pol = make_policy("adaptive-k(threshold=0.3)")
    pol.reset(model, cache, None)
    r = req(0, 0, [[1, 3], [1, 3], [2, 4]], [[0.6, 0.4], [0.55, 0.45], [0.72, 0.28]], phase="prefill")
    assert r.experts_in_access_order() == [1, 3, 2, 4]
    (plan,) = drive(pol, cache, [r])
    assert plan.topk.tolist() == [[1, 3], [1, 3], [2, -1]]
    assert plan.weights.tolist() == [[0.6, 0.4], [0.55, 0.45], [0.72 + 0.28, 0.0]]
    assert plan.dropped_mass == pytest.approx(0.28) and plan.substituted_mass == 0.0
    # executed masses: 1: 1.15, 2: 1.0 (renormalised), 3: 0.85: expert 2 now comes before 3
    assert plan.execute == [(0, 1), (0, 2), (0, 3)]
    keep = make_policy("adaptive-k(threshold=0.3, renormalize=False)")
    keep.reset(model, ExpertCache(4, 1, "global"), None)
    plan = keep.plan(r, ExpertCache(4, 1, "global"))
    assert plan.weights.tolist()[2] == [0.72, 0.0] and plan.execute == [(0, 1), (0, 3), (0, 2)]
    # nothing below the threshold: the base's own plan, routing untouched
    plan = pol.plan(req(1, 0, [[1, 3]], [[0.5, 0.5]]), cache)
    assert plan.topk is None and plan.dropped_mass == 0.0


# -- properties on random traces --------------------------------------------------------------------
@st.composite
def step_traces(draw: st.DrawFn) -> tuple:
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(2, experts)))
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, 10))):
        phase = draw(st.sampled_from(["prefill", "decode", "decode"]))
        tokens = draw(st.integers(1, 3)) if phase == "prefill" else 1
        calls: list[Rows] = []
        for _layer in range(layers):
            rows, ws = [], []
            for _t in range(tokens):
                rows.append(draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True)))
                ws.append(draw(st.lists(st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.5, 0.7]), min_size=top_k, max_size=top_k)))
            calls.append((rows, ws))
        steps.append((phase, calls))
    max_distinct = max(len({e for r in rows for e in r}) for _, calls in steps for rows, _ in calls)
    slots = draw(st.integers(max_distinct, max_distinct + 4))
    noisy = draw(st.booleans())
    look_rows = {}
    if noisy:  # an imperfect look-ahead: random guesses
        for s, (_, calls) in enumerate(steps):
            for x in range(layers):
                look_rows[(s, x)] = [draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True))
                                     for _ in calls[x][0]]
    return layers, experts, top_k, slots, steps, look_rows


LOSSLESS_PREFETCH = ["lru+lookahead", "lru+lookahead(depth=2, budget=3)", "lfu+lookahead(predictor=history)",
                     "fifo+lookahead(depth=2, budget=1)", "moe-infinity", "moe-infinity(window=1, budget=3)",
                     "moe-infinity(capacity=1, budget=1)"]
DEMAND = ["moe-infinity(budget=0)", "lru+lookahead(budget=0)", "lfu+lookahead(budget=0)"]


@settings(settings.get_profile("policies-a"))
@given(step_traces())
def test_properties_on_random_traces(tmp_path_factory: pytest.TempPathFactory, case: tuple) -> None:
    layers, experts, top_k, slots, steps, look_rows = case
    model = toy_model(num_layers=layers, num_experts=experts, top_k=top_k, expert_bytes=EB)
    tmp = tmp_path_factory.mktemp("prop")
    path = write_steps(tmp / "t.jsonl", model, steps, lookahead=2, look_rows=look_rows)
    hw = profile_file(tmp, "toy", latency=1e-4, dense=1e-4, gpu=5e-5, cpu_fixed=2e-5, cpu_per_token=1e-4)
    cache = CacheConfig(experts=slots)
    belady = metrics(path, "belady", cache, hw)
    lru = metrics(path, "lru", cache, hw)
    for spec in LOSSLESS_PREFETCH + DEMAND + ["lru+fiddler", "lfu+fiddler+lookahead"]:
        m = metrics(path, spec, cache, hw)
        assert m["dropped_mass"] == 0.0 and m["substituted_mass"] == 0.0, spec  # lossless
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"], spec
        assert m["bytes_h2d"] == (m["misses"] + m["prefetches"]) * EB, spec
        if spec in DEMAND:  # Belady is the optimum of demand replacement
            assert m["prefetches"] == 0 and belady["hits"] >= m["hits"], spec
        if spec in LOSSLESS_PREFETCH:
            # a prefetch can turn a miss into a hit, so a prefetching policy may have more hits than
            # Belady; it cannot copy less: demand MIN needs the fewest copies of any policy
            assert m["misses"] + m["prefetches"] >= belady["misses"], spec
            assert m["accesses"] == lru["accesses"], spec
        if "fiddler" in spec:  # every routed expert runs, on the GPU or the CPU
            assert m["accesses"] + m["cpu_experts"] == lru["accesses"], spec
    # adaptive-k with threshold 0 is its base; with a threshold it drops less than that share
    assert metrics(path, "adaptive-k(threshold=0)", cache, hw) == lru
    ak = metrics(path, "lru+adaptive-k(threshold=0.3)", cache, hw)
    assert ak["accesses"] <= lru["accesses"] and ak["dropped_mass"] < 0.3 and ak["substituted_mass"] == 0.0
    if top_k == 1:
        assert ak == lru


def test_every_policy_replays_a_synthetic_trace_with_prefill_and_lookahead(tmp_path: Path) -> None:
    model = toy_model(num_layers=4, num_experts=8, top_k=2, expert_bytes=EB)
    path = write_steps(tmp_path / "t.jsonl", model, random_steps(random.Random(5), 4, 8, 2, 120, prefill_every=20), lookahead=2)
    hw = profile_file(tmp_path, "toy", latency=1e-4, dense=2e-4, gpu=5e-5, cpu_fixed=2e-5, cpu_per_token=4e-5)
    lru = metrics(path, "lru", CacheConfig(experts=12), hw)
    for spec in ["lru+lookahead(depth=2, budget=3)", "moe-infinity(budget=3)", "lru+fiddler", "adaptive-k(threshold=0.3)"]:
        m = metrics(path, spec, CacheConfig(experts=12), hw)
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"] > 0
        if "lookahead" in spec or "infinity" in spec:
            assert m["prefetches"] > 0 and m["hit_rate"] > lru["hit_rate"], (spec, m["hit_rate"], lru["hit_rate"])
        if "fiddler" in spec:
            assert 0 < m["cpu_experts"] and m["accesses"] + m["cpu_experts"] == lru["accesses"]
        if "adaptive" in spec:
            assert 0 < m["dropped_mass"] < 0.3 and m["accesses"] < lru["accesses"]


# -- copies that wait for their slot ----------------------------------------------------------------
def test_a_call_reusing_a_slot_while_a_prefetch_it_uses_is_queued_completes(tmp_path: Path) -> None:
    """A prefill call that needs more experts than the cache holds reuses the slot of one of its
    experts that ran (its urgent load waits for that compute), while an expert it runs earlier is
    still a queued prefetch. A copy engine that held the urgent load until its slot was free could
    never start the prefetch (the simulation stopped with no events left); a copy waiting for its
    slot now leaves the queue without an engine until the slot is free."""
    model = toy_model(num_layers=3, num_experts=8, top_k=2, expert_bytes=EB)
    path = write_steps(tmp_path / "t.jsonl", model, random_steps(random.Random(20), 3, 8, 2, 12, prefill_every=4, prefill_tokens=6),
                       lookahead=2)
    hw = profile_file(tmp_path, "toy", latency=1e-3, dense=1e-4, gpu=1e-4, cpu_fixed=1e-3, cpu_per_token=0.0)
    m = metrics(path, "lru+lookahead(depth=2, budget=4)", CacheConfig(experts=5), hw)
    assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"] and m["inflight_hits"] > 0


def test_emulated_link_never_holds_a_copy_waiting_for_its_slot() -> None:
    """The runtime's emulated link, the same two cases: (1) an urgent copy whose slot is released
    only after the compute used a prefetch queued behind it; (2) an urgent copy into the slot of a
    prefetch that has not started (it waits for that copy, which goes first)."""
    _runtime()
    import threading

    import torch

    from runtime.links import Copy, EmulatedLink, parse_link

    link = EmulatedLink(parse_link("emulated:1GB/s,10us"))
    try:
        src = torch.ones(1000)
        release = threading.Event()
        u = Copy((0, 1), src, torch.empty(1000), urgent=True, wait=[release])
        p = Copy((0, 2), src, torch.empty(1000), urgent=False)
        link.submit(u)
        link.submit(p)
        assert p.done.wait(timeout=10)  # the compute needs p before it releases u's slot
        assert not u.done.is_set()
        release.set()
        assert u.done.wait(timeout=10)
        p2 = Copy((0, 3), src, torch.empty(1000), urgent=False)
        blocker = Copy((0, 4), src, torch.empty(1000), urgent=True, wait=[threading.Event()])  # parked for good
        link.submit(blocker)
        link.submit(p2)
        u2 = Copy((0, 5), src, torch.empty(1000), urgent=True)
        u2.wait.append(p2.done)  # evicts (0, 3) while its copy may still be queued
        link.submit(u2)
        assert u2.done.wait(timeout=10) and p2.done.is_set()
    finally:
        link.close()


# -- the real Mixtral trace -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["moe-infinity", "lru+lookahead", "moe-infinity(window=32)", "lru+fiddler", "adaptive-k(threshold=0.2)"])
def test_mixtral_trace_replays_and_prints_a_summary(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    from sim.replay import main

    assert main([str(MIXTRAL), "--policy", spec, "--cache-per-layer", "2", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "hit rate" in out and "TPOT" in out
    if "lookahead" in spec:  # the imported trace has no lookahead field: the history fallback ran
        assert "predicted from history" in err


# -- the runtime: the same decisions as the simulator -----------------------------------------------
RT_LINK = "emulated:2GB/s,20us"
PROMPTS = ["offloading experts to the host", "a second, longer prompt about caches and copies"]
COUNTS = ("accesses", "misses", "prefetches", "wasted_prefetches", "bytes_h2d", "cpu_experts", "dropped_mass",
          "substituted_mass", "layer_calls", "steps")


def _runtime() -> None:
    pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
    pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")


def _same(m: dict, r: dict, what: object) -> None:
    for key in COUNTS:
        assert m[key] == r[key], (what, key, m[key], r[key])
    assert m["hits"] + m["inflight_hits"] == r["hits"] + r["inflight_hits"], what


@pytest.mark.parametrize(
    ("model", "spec", "size"),
    [
        ("tiny-mixtral", "lru+lookahead(depth=2, budget=3)", {"cache_experts": 10}),
        ("tiny-mixtral", "lfu+lookahead(predictor=history)", {"cache_experts": 9}),
        ("tiny-mixtral", "moe-infinity(budget=3)", {"cache_experts": 10}),
        ("tiny-mixtral", "moe-infinity(window=2)", {"cache_per_layer": 3}),
        ("tiny-mixtral", "adaptive-k(threshold=0.45)", {"cache_per_layer": 2}),
        ("tiny-mixtral", "lru+adaptive-k(threshold=0.45)+lookahead", {"cache_experts": 9}),
        ("tiny-qwen2-moe", "lru+lookahead(depth=2)", {"cache_experts": 8}),
        ("tiny-deepseek-v3", "moe-infinity(budget=2)", {"cache_experts": 8}),
        ("tiny-olmoe", "moe-infinity", {"cache_per_layer": 6}),
        ("tiny-olmoe", "adaptive-k(threshold=0.3)", {"cache_per_layer": 5}),
        ("tiny-qwen3-moe", "fifo+lookahead(budget=4)", {"cache_experts": 14}),
    ],
)
def test_runtime_and_simulator_decide_alike(tmp_path: Path, model: str, spec: str, size: dict) -> None:
    """Record a run of the policy (runtime), replay that trace with the same spec (simulator)."""
    _runtime()
    from runtime.record import record

    trace = tmp_path / "run.jsonl.gz"
    m = record(model, PROMPTS, trace, policy=spec, link=RT_LINK, max_new_tokens=6, progress=False, **size)
    r = replay(trace, spec, CacheConfig(experts=size.get("cache_experts"), per_layer=size.get("cache_per_layer"))).metrics
    _same(m, r, (model, spec))
    if "lookahead" in spec and "budget=0" not in spec and "history" not in spec or "infinity" in spec:
        assert m["prefetches"] > 0
    if "adaptive" in spec:
        assert m["dropped_mass"] > 0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    _runtime()
    from runtime.calibrate import calibrate

    return calibrate("tiny-mixtral", RT_LINK, repeats=1)


def test_fiddler_validates_with_the_shared_cost_model(tmp_path: Path, calibrated: dict) -> None:
    """runtime.validate gives the policy the profile's cost model in both engines. The profile is the
    one calibrated on this machine with the expert costs set by hand (on a machine without a GPU the
    'GPU' is this CPU, so the measured costs always favour the CPU): a GPU expert costs 30 us, a CPU
    expert 0.4 x (the calibrated transfer + 30 us) per token, so misses of one or two token rows (the
    decode steps) run on the CPU and the prefill's larger ones are copied."""
    from runtime.models import load_model
    from runtime.offload import model_spec
    from runtime.validate import validate

    prof = json.loads(json.dumps(calibrated))
    link = prof["link"]
    transfer = link["latency_us"] * 1e-6 + model_spec(load_model("tiny-mixtral")[0]).expert_bytes / (link["h2d_gbps"] * 1e9)
    prof["fit"]["cpu_expert"] = {"fixed_s": 0.0, "per_token_s": 0.4 * (transfer + 3e-5), "floor_s": 0.0, "points": []}
    prof["fit"]["gpu_expert"] = {"fixed_s": 3e-5, "per_token_s": 0.0, "floor_s": 0.0, "points": []}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    for spec in ("lru+fiddler", "lru+fiddler+lookahead"):
        res = validate("tiny-mixtral", spec, cache_per_layer=2, link=RT_LINK, profile=str(path), prompts=PROMPTS,
                       max_new_tokens=6, out_dir=tmp_path / spec)
        rows = {r["metric"]: r for r in res["rows"]}
        assert res["counts_equal"], res["rows"]
        assert rows["cpu_experts"]["measured"] > 0 and rows["misses"]["measured"] > 0, rows


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek-v3", "tiny-qwen3-moe"])
def test_lossless_prefetch_policies_are_exact_in_the_runtime(name: str) -> None:
    _runtime()
    import torch

    from runtime import offload
    from runtime.models import load_model
    from runtime.offload import model_spec

    model, _ = load_model(name)
    model.set_experts_implementation("eager")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    gen_kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, **gen_kw)
    spec = model_spec(model)
    k = spec.top_k
    cm = CostModel(5e-5, 2e9, {"full": spec.expert_bytes}, ComputeCost(), ComputeCost(3e-5), ComputeCost(2e-5, 4e-5))
    # moe-infinity: one forward and one generate are one sequence (consecutive prefills); window=2
    # starts new ones during the decode, so the collection fills and it prefetches
    for pol in ["lru+lookahead(depth=2, budget=3)", "moe-infinity(budget=3, window=2)", "lru+fiddler", "lfu+fiddler+lookahead"]:
        with offload(model, pol, cache_experts=2 * k + 1, link=RT_LINK, costs=cm) as s, torch.no_grad():
            out = model(ids).logits
            gen = model.generate(ids, **gen_kw)
        assert torch.equal(out, ref), (name, pol)
        assert torch.equal(gen, ref_gen), (name, pol)
        m = s.metrics
        assert m["dropped_mass"] == 0.0 and m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"]
        if "fiddler" in pol:
            assert m["cpu_experts"] > 0 and m["misses"] > 0, (name, pol, m)
        else:
            assert m["prefetches"] > 0, (name, pol)


def test_tiny_trace_recorded_with_lookahead_replays_under_every_policy(tmp_path: Path) -> None:
    _runtime()
    from runtime.record import record

    trace = tmp_path / "exact.jsonl.gz"
    record("tiny-mixtral", PROMPTS, trace, link=RT_LINK, max_new_tokens=8, lookahead=2, progress=False)
    hw = profile_file(tmp_path, "tiny-mixtral", latency=1e-4, dense=2e-4, gpu=3e-5, cpu_fixed=2e-5, cpu_per_token=4e-5)
    for spec in ["lru+lookahead(depth=2, budget=3)", "moe-infinity(budget=3)", "lru+fiddler", "adaptive-k(threshold=0.4)"]:
        res = replay(trace, spec, CacheConfig(experts=8), hw)
        m = res.metrics
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"] > 0, spec
        assert not any("history" in n for n in res.notes), res.notes  # the recorded look-ahead was used
        if "lookahead" in spec or "infinity" in spec:
            assert m["prefetches"] > 0, spec
