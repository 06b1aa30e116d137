"""The lossy policies mobile, substitute, buddy and hobbit: what each decides, their parameters, the
same decisions in the simulator and the runtime, and what they cost in quality."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lab.cache import CacheConfig
from policies import Counters, ExpertCache, LayerRequest, PolicySpecError, apply_plan, make_policy
from policies.costs import variant_bytes
from sim.replay import ReplayError, replay
from traces.io import TraceWriter
from traces.schema import Fields, Header, LayerRecord, ModelSpec, Recording, StepRecord
from traces.synthetic import iid_calls, toy_model, write_trace

EB = 1_000_000  # expert bytes of the synthetic models (bf16)
COUNTS = ("accesses", "misses", "bytes_h2d", "prefetches", "layer_calls", "steps", "dropped_mass", "substituted_mass")


# -- a synthetic trace with every optional field ----------------------------------------------------
def synthetic(path: Path, layers: int = 4, experts: int = 16, k: int = 2, steps: int = 250, tokens: int = 1,
              seed: int = 0, look_err: float = 0.3) -> ModelSpec:
    """Decode steps whose routing has structure (a per-layer popularity plus per-token noise), the
    router's probabilities, its importance (1 - normalised entropy) and a look-ahead that is the next
    layer's true choice with a fraction `look_err` of its slots replaced at random."""
    rng = np.random.default_rng(seed)
    model = ModelSpec(name="synth", arch="mixtral", num_layers=layers, moe_layers=list(range(layers)), num_experts=experts,
                      top_k=k, hidden_size=64, moe_intermediate_size=128, dtype="bf16", expert_bytes=EB, dense_bytes=0)
    header = Header(model=model, recording=Recording(prompt_source="synthetic"),
                    fields=Fields(probs=True, lookahead=True, importance=True))
    base = rng.normal(size=(layers, experts)) * 1.5
    with TraceWriter(path, header) as w:
        for s in range(steps):
            calls = []
            for layer in range(layers):
                logits = base[layer] + rng.normal(size=(tokens, experts)) * 1.5
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                top = np.argsort(-p, axis=1, kind="stable")[:, :k]
                wt = np.take_along_axis(p, top, 1)
                wt /= wt.sum(axis=1, keepdims=True)
                imp = 1 + (p * np.log(p)).sum(axis=1) / math.log(experts)
                calls.append((top, wt, p, imp))
            for layer, (top, wt, p, imp) in enumerate(calls):
                look = {}
                if layer + 1 < layers:
                    nxt = calls[layer + 1][0].copy()
                    for r in range(tokens):
                        for j in range(k):
                            if rng.random() < look_err:
                                e = int(rng.integers(experts))
                                if e not in nxt[r]:
                                    nxt[r, j] = e
                    look[str(layer + 1)] = nxt.tolist()
                w.write(LayerRecord(step=s, phase="decode", layer=layer, tokens=tokens, topk=top.tolist(), weights=wt.tolist(),
                                    probs=p.tolist(), lookahead=look, importance=imp.tolist()))
            w.write(StepRecord(step=s, phase="decode", seq_ids=[0]))
    return model


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "synth.jsonl.gz"
    synthetic(path)
    return path


@pytest.fixture(scope="module")
def prefill_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "prefill.jsonl.gz"
    synthetic(path, experts=8, k=4, steps=40, tokens=5, seed=3)
    return path


def _run(trace: Path, spec: str, **cache: object) -> dict:
    return replay(trace, spec, CacheConfig(**cache), "rtx4090").metrics  # type: ignore[arg-type]


def _req(layer: int, topk: list[list[int]], weights: list[list[float]], step: int = 0, **kw: object) -> LayerRequest:
    return LayerRequest(step, "decode", layer, np.array(topk), np.array(weights, dtype=np.float64), **kw)  # type: ignore[arg-type]


def _setup(spec: str, capacity: int, layers: int = 2, experts: int = 8, top_k: int = 2, dtype: str = "bf16"):  # type: ignore[no-untyped-def]
    model = toy_model(num_layers=layers, num_experts=experts, top_k=top_k, expert_bytes=EB).model_copy(update={"dtype": dtype})
    cache = ExpertCache(capacity, layers, "global")
    pol = make_policy(spec)
    pol.reset(model, cache, None)
    return pol, cache, Counters(), variant_bytes(model, pol)


def _apply(pol, cache, counters, vb, req):  # type: ignore[no-untyped-def]
    plan = pol.plan(req, cache)
    apply_plan(cache, req, plan, counters, vb)
    for k in list(cache.inflight):  # the copies land before the next call
        cache.complete(k)
    return plan


# -- parameters and trace fields ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mobile(threshold=-0.1)", "threshold"), ("mobile(threshold=1.5)", "threshold"), ("mobile(metric=loud)", "metric"),
        ("mobile(prefetch=-1)", "prefetch"), ("mobile(evict=mru)", "evict"), ("mobile(depth=2)", "no parameter 'depth'"),
        ("substitute(threshold=2)", "threshold"), ("substitute(similarity=weight)", "similarity"),
        ("substitute(min_similarity=1)", "min_similarity"), ("buddy(budget=-1)", "budget"), ("buddy(threshold=1.01)", "threshold"),
        ("hobbit(bits=3)", "bits"), ("hobbit(bits=16)", "bits"), ("hobbit(threshold=-1)", "threshold"),
        ("hobbit(upgrade=maybe)", "upgrade"),
    ],
)
def test_parameters_out_of_range_are_refused(spec: str, fragment: str) -> None:
    with pytest.raises(PolicySpecError, match=fragment):
        make_policy(spec)


def test_canonical_specs_and_lossy_flags() -> None:
    assert make_policy("mobile").spec == "mobile(threshold=0.2, metric=confidence, prefetch=0, evict=lru)"
    assert make_policy("hobbit(bits=8)").spec == "hobbit(bits=8, threshold=0.3, upgrade=True, evict=lru)"
    for name in ("mobile", "substitute", "buddy", "hobbit"):
        assert not make_policy(name).lossless


def test_trace_fields_each_policy_needs(tmp_path: Path) -> None:
    need = {
        "mobile": set(), "mobile(metric=entropy)": {"probs"}, "mobile(metric=importance)": {"importance"},
        "mobile(prefetch=2)": set(), "substitute": set(), "substitute(similarity=probs)": {"probs"}, "buddy": {"lookahead"},
        "hobbit": set(),
    }
    for spec, fields in need.items():
        assert make_policy(spec).required_fields() == fields, spec
    assert make_policy("mobile(prefetch=2)").uses == {"lookahead"}  # read where present, not required
    assert make_policy("mobile(prefetch=2)").lookahead_depth == 1
    bare = tmp_path / "bare.jsonl"
    write_trace(bare, toy_model(num_experts=8, top_k=2), iid_calls([1.0] * 8, 20, top_k=2))
    for spec in ("mobile(metric=entropy)", "mobile(metric=importance)", "substitute(similarity=probs)", "buddy"):
        with pytest.raises(ReplayError, match="needs the trace field"):
            _run(bare, spec, experts=4)
    assert _run(bare, "mobile(prefetch=2)", experts=4)["prefetches"] == 0  # no look-ahead: no prefetch


def test_hobbit_refuses_bits_that_save_nothing(tmp_path: Path) -> None:
    pol, *_ = _setup("hobbit(bits=4)", 4, dtype="fp32")
    assert variant_bytes(pol.model, pol) == {"full": EB, "low": EB // 8}
    assert variant_bytes(pol.model.model_copy(update={"dtype": "bf16"}), pol)["low"] == EB // 4
    assert variant_bytes(pol.model, make_policy("lru")) == {"full": EB}
    with pytest.raises(PolicySpecError, match="saves nothing"):
        _setup("hobbit(bits=8)", 4, dtype="fp8")
    path = tmp_path / "fp8.jsonl"
    write_trace(path, toy_model(num_experts=8, top_k=2).model_copy(update={"dtype": "fp8"}), iid_calls([1.0] * 8, 5, top_k=2))
    with pytest.raises(PolicySpecError, match="saves nothing"):
        _run(path, "hobbit(bits=8)", experts=4)


# -- what each policy decides --------------------------------------------------------------------------
def test_mobile_runs_the_little_set_of_unimportant_tokens() -> None:
    pol, cache, c, vb = _setup("mobile(threshold=0.3)", 8, experts=8, top_k=4)
    # token 0: little set {1, 2} holds 0.8 -> outside it 0.2 < 0.3: little; token 1: outside 0.4: big
    req = _req(0, [[3, 1, 2, 0], [2, 5, 6, 7]], [[0.1, 0.5, 0.3, 0.1], [0.35, 0.25, 0.2, 0.2]])
    plan = _apply(pol, cache, c, vb, req)
    assert plan.topk.tolist() == [[-1, 1, 2, -1], [2, 5, 6, 7]]
    assert plan.weights[0].tolist() == pytest.approx([0.0, 0.625, 0.375, 0.0])
    assert plan.weights[1].tolist() == [0.35, 0.25, 0.2, 0.2]
    assert plan.dropped_mass == pytest.approx(0.2) and plan.substituted_mass == 0.0
    # access order of the executed assignment: 2 (0.375 + 0.35), 1 (0.625), 5, then 6 and 7 tied -> lower id
    assert [k[1] for k in plan.execute] == [2, 1, 5, 6, 7] == [k[1] for k in plan.order]  # all missed: load order
    assert [ld.key[1] for ld in plan.loads] == [2, 1, 5, 6, 7]
    assert c.dropped_mass == pytest.approx(0.2) and c.routed_mass == pytest.approx(2.0)
    # hits first, then the loads
    plan = _apply(pol, cache, c, vb, _req(0, [[0, 6, 4, 3]], [[0.3, 0.3, 0.2, 0.2]]))
    assert [k[1] for k in plan.order] == [6, 0, 3, 4] and [ld.key[1] for ld in plan.loads] == [0, 3, 4]
    assert plan.topk is None  # an important token: as routed


def test_mobile_metrics() -> None:
    probs = np.array([[0.9] + [0.1 / 7] * 7, [1 / 8] * 8])  # decided, undecided
    req = _req(0, [[0, 1], [2, 3]], [[0.9, 0.1], [0.5, 0.5]], probs=probs, importance=np.array([0.8, 0.0]))
    ent = make_policy("mobile(metric=entropy, threshold=0.5)")
    h0 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1 / 7)) / math.log(8)
    assert ent.scores(req).tolist() == pytest.approx([h0, 1.0]) and h0 < 0.5
    pol, cache, c, vb = _setup("mobile(metric=entropy, threshold=0.5)", 8)
    assert _apply(pol, cache, c, vb, req).topk.tolist() == [[0, -1], [2, 3]]  # the decided token runs little
    pol, cache, c, vb = _setup("mobile(metric=importance, threshold=0.5)", 8)
    assert _apply(pol, cache, c, vb, req).topk.tolist() == [[0, 1], [2, -1]]  # importance 0 < 0.5: little
    pol, cache, c, vb = _setup("mobile(threshold=0.11)", 8)
    assert _apply(pol, cache, c, vb, req).topk.tolist() == [[0, -1], [2, 3]]


def test_mobile_prefetches_little_experts_of_the_next_layer() -> None:
    pol, cache, c, vb = _setup("mobile(threshold=0, prefetch=1)", 4, layers=3)
    look = {1: np.array([[5, 6]]), 2: np.array([[1, 2]])}
    plan = _apply(pol, cache, c, vb, _req(0, [[0, 1]], [[0.6, 0.4]], lookahead=look))
    assert [(ld.key, ld.victim) for ld in plan.prefetch] == [((1, 5), None)]  # the little column only, budget 1
    plan = _apply(pol, cache, c, vb, _req(1, [[5, 7]], [[0.6, 0.4]], lookahead={2: np.array([[1, 2]])}))
    assert plan.order == [(1, 5), (1, 7)] and [ld.key for ld in plan.loads] == [(1, 7)]  # the prefetched expert hits
    assert c.hits == 1 and c.prefetches == 2
    # the prefetch evicted neither an expert of this call nor the call's own loads
    assert (1, 7) in cache and (1, 5) in cache and (2, 1) in cache


def _resident(cache: ExpertCache, *keys: tuple[int, int]) -> None:
    for k in keys:
        cache.apply_load(k, None)
        cache.complete(k)


def test_substitute_replaces_unimportant_misses_by_the_most_similar_resident() -> None:
    pol, cache, c, vb = _setup("substitute(threshold=0.3)", 5, layers=1, experts=8)
    # history: 0 and 5 each go with 1 and with 4; 2 goes with 3. Cosine of the co-activation rows:
    # 0~1 = 0~4 = 2/3, 0~5 = 1/3, 0~2 = 0~3 = 0~6 = 0
    for row in ([0, 1], [0, 4], [5, 1], [5, 4], [2, 3], [2, 3]):
        pol.stats.add(_req(0, [row], [[0.6, 0.4]]))
    assert pol.stats.cosine(0, 0)[[1, 4, 5, 2, 6]].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0, 0])
    _resident(cache, (0, 2), (0, 3), (0, 5), (0, 6))
    # 0 is missing with share 0.2 < 0.3: the most similar resident expert the token does not run is 5
    plan = _apply(pol, cache, c, vb, _req(0, [[3, 0]], [[0.8, 0.2]]))
    assert plan.topk.tolist() == [[3, 5]] and not plan.loads and plan.substituted_mass == pytest.approx(0.2)
    assert [k[1] for k in plan.execute] == [3, 5] and c.substituted_mass == pytest.approx(0.2)
    _resident(cache, (0, 4))
    plan = _apply(pol, cache, c, vb, _req(0, [[3, 0]], [[0.8, 0.2]]))
    assert plan.topk.tolist() == [[3, 4]]  # now 4 (2/3) beats 5 (1/3)
    # share 0.5 >= threshold: important, loaded; victim: fewest uses (2, 6: none), ties least recent (2)
    plan = _apply(pol, cache, c, vb, _req(0, [[3, 0]], [[0.5, 0.5]]))
    assert plan.topk is None and [(ld.key, ld.victim) for ld in plan.loads] == [((0, 0), (0, 2))]
    assert [k[1] for k in plan.order] == [3, 0]  # hits first, then the load
    # a prefill call: 7 is important for the second token, so the first token runs 7 too
    plan = _apply(pol, cache, c, vb, _req(0, [[3, 7], [7, 0]], [[0.9, 0.1], [0.5, 0.5]]))
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 7)]


def test_substitute_loads_when_no_resident_expert_qualifies() -> None:
    pol, cache, c, vb = _setup("substitute(threshold=0.5)", 4, layers=2, experts=8)
    _apply(pol, cache, c, vb, _req(1, [[0, 1]], [[0.6, 0.4]]))
    plan = _apply(pol, cache, c, vb, _req(0, [[2, 3]], [[0.6, 0.4]]))  # layer 0 has nothing resident
    assert plan.topk is None and len(plan.loads) == 2
    plan = _apply(pol, cache, c, vb, _req(0, [[2, 4]], [[0.6, 0.4]]))  # 4 never seen with anything: no similarity
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 4)]


def test_buddy_substitutes_only_in_calls_its_prefetch_covered() -> None:
    pol, cache, c, vb = _setup("buddy(budget=1)", 8, layers=2, experts=8)
    for layer, row in ((1, [0, 1]), (1, [0, 1]), (1, [2, 1]), (0, [7, 3])):
        pol.stats.add(_req(layer, [row], [[0.6, 0.4]]))
    _resident(cache, (1, 0), (1, 2), (1, 4))
    # layer 0 is never covered: its misses load; the look-ahead's most predicted expert not resident is prefetched
    plan = _apply(pol, cache, c, vb, _req(0, [[3, 5]], [[0.7, 0.3]], step=0, lookahead={1: np.array([[4, 6]])}))
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 3), (0, 5)]
    assert [ld.key for ld in plan.prefetch] == [(1, 6)]  # (1, 4) is resident; budget 1
    # layer 1 of the same step is covered: 1 missed the prefetch; its buddy, most often routed with it, is 0
    plan = _apply(pol, cache, c, vb, _req(1, [[4, 1]], [[0.7, 0.3]], step=0))
    assert plan.topk.tolist() == [[4, 0]] and plan.substituted_mass == pytest.approx(0.3) and not plan.loads
    # next step, layer 0 again: 7 has a resident buddy (3) but the call is not covered: loaded
    plan = _apply(pol, cache, c, vb, _req(0, [[5, 7]], [[0.7, 0.3]], step=1))
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 7)]
    # no look-ahead at that call: the next one is not covered either
    plan = _apply(pol, cache, c, vb, _req(1, [[4, 3]], [[0.7, 0.3]], step=1))
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(1, 3)]
    # a token's only expert is never substituted at the default threshold (share 1.0 is not < 1.0)
    pol, cache, c, vb = _setup("buddy", 4, layers=2, experts=8, top_k=1)
    for step, e in enumerate([0, 1, 0]):
        _apply(pol, cache, c, vb, _req(0, [[e]], [[1.0]], step=step, lookahead={1: np.array([[e]])}))
        _apply(pol, cache, c, vb, _req(1, [[e]], [[1.0]], step=step))
    assert c.substituted_mass == 0.0


def test_hobbit_loads_low_copies_and_upgrades_them() -> None:
    pol, cache, c, vb = _setup("hobbit(bits=4, threshold=0.3)", 4, layers=1, experts=8)
    assert vb == {"full": EB, "low": EB // 4}
    plan = _apply(pol, cache, c, vb, _req(0, [[0, 1]], [[0.8, 0.2]]))
    assert [(ld.key[1], ld.victim, ld.variant) for ld in plan.loads] == [(0, None, "full"), (1, None, "low")]
    assert cache.resident == {(0, 0): "full", (0, 1): "low"} and c.bytes_h2d == EB + EB // 4
    plan = _apply(pol, cache, c, vb, _req(0, [[2, 1]], [[0.9, 0.1]]))  # 1 is not critical here: a hit at low precision
    assert [ld.key[1] for ld in plan.loads] == [2] and c.hits == 1
    plan = _apply(pol, cache, c, vb, _req(0, [[1, 2]], [[0.6, 0.4]]))  # critical now: upgraded in its own slot
    assert [(ld.key, ld.victim, ld.variant) for ld in plan.loads] == [((0, 1), (0, 1), "full")]
    assert plan.order == [(0, 2), (0, 1)] and cache.resident[(0, 1)] == "full" and len(cache) == 3
    assert (c.accesses, c.hits, c.misses) == (6, 2, 4) and c.bytes_h2d == 3 * EB + EB // 4
    pol, cache, c, vb = _setup("hobbit(threshold=0.3, upgrade=False)", 4, layers=1, experts=8)
    _apply(pol, cache, c, vb, _req(0, [[0, 1]], [[0.8, 0.2]]))
    assert _apply(pol, cache, c, vb, _req(0, [[1, 2]], [[0.6, 0.4]])).loads[0].key == (0, 2)


# -- the simulator ------------------------------------------------------------------------------------
SPECS = ["mobile(threshold=0.3)", "mobile(metric=entropy, threshold=0.8, prefetch=2)", "mobile(metric=importance, threshold=0.3)",
         "substitute(threshold=0.4)", "substitute(similarity=probs, threshold=0.4)", "buddy", "buddy(budget=1, evict=lfu)",
         "hobbit(threshold=0.4)", "hobbit(bits=8, threshold=0.4, evict=lfu)"]


@pytest.mark.parametrize("spec", SPECS)
def test_each_policy_replays_and_counts_add_up(trace: Path, prefill_trace: Path, spec: str) -> None:
    for path, size in ((trace, {"experts": 24}), (trace, {"per_layer": 4}), (prefill_trace, {"experts": 16})):
        m = _run(path, spec, **size)
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"] > 0
        assert 0 <= m["dropped_mass"] < 1 and 0 <= m["substituted_mass"] < 1
        if spec.startswith("hobbit"):
            assert m["dropped_mass"] == m["substituted_mass"] == 0
        elif not spec.startswith("mobile"):
            assert m["dropped_mass"] == 0
    m = _run(trace, spec, experts=24)
    if not spec.startswith("hobbit"):
        assert m["dropped_mass"] + m["substituted_mass"] > 0


def test_threshold_zero_is_the_base_policy(trace: Path, prefill_trace: Path) -> None:
    """mobile with threshold 0 (every token important) is its base policy exactly; so are the others
    with their lossy rule switched off."""
    pairs = [("mobile(threshold=0)", "lru"), ("mobile(threshold=0, evict=lfu)", "lfu"), ("hobbit(threshold=0)", "lru"),
             ("substitute(threshold=0)", "lfu"), ("substitute(threshold=0, evict=lru)", "lru"), ("buddy(threshold=0, budget=0)", "lru")]
    for path, size in ((trace, {"experts": 20}), (trace, {"per_layer": 3}), (prefill_trace, {"experts": 12})):
        for spec, base in pairs:
            assert _run(path, spec, **size) == _run(path, base, **size), (spec, size)


def test_lossy_mass_grows_with_the_threshold(trace: Path) -> None:
    for fam, key in (("mobile(threshold={})", "dropped_mass"), ("mobile(metric=entropy, threshold={})", "dropped_mass"),
                     ("substitute(threshold={})", "substituted_mass"), ("buddy(threshold={})", "substituted_mass")):
        masses = [_run(trace, fam.format(t), experts=20)[key] for t in (0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0)]
        assert masses[0] == 0 and masses[-1] > 0, fam
        assert all(a <= b for a, b in zip(masses, masses[1:], strict=False)), (fam, masses)


def test_hobbit_moves_fewer_bytes_than_lru(trace: Path, prefill_trace: Path) -> None:
    for path, size in ((trace, {"experts": 24}), (trace, {"per_layer": 3}), (prefill_trace, {"experts": 12})):
        lru = _run(path, "lru", **size)
        for spec in ("hobbit(threshold=0.3)", "hobbit(threshold=0.5)", "hobbit(bits=8, threshold=0.5)", "hobbit(threshold=1.0)"):
            m = _run(path, spec, **size)
            assert m["bytes_h2d"] < lru["bytes_h2d"], (spec, size)
            assert m["tpot_s"] < lru["tpot_s"], (spec, size)
            # full and low loads only: bytes = full x n_full + low x n_low
            low = EB * (8 if "bits=8" in spec else 4) // 16
            n_low = (m["misses"] * EB - m["bytes_h2d"]) // (EB - low)
            assert 0 < n_low <= m["misses"] and m["bytes_h2d"] == (m["misses"] - n_low) * EB + n_low * low


# -- the runtime -------------------------------------------------------------------------------------
torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from runtime import offload  # noqa: E402
from runtime.models import TINY, load_model  # noqa: E402
from runtime.quality import compare, teacher_forced  # noqa: E402
from runtime.quant import Quantizer  # noqa: E402
from runtime.record import encode, record  # noqa: E402

LINK = "emulated:200GB/s"
PROMPTS = ["offloading experts", "a second, longer prompt about caches"]
RT_SPECS = ["mobile(threshold=0.48)", "mobile(metric=importance, threshold=0.1, prefetch=2)", "mobile(metric=entropy, threshold=0.999)",
            "substitute(threshold=0.5)", "substitute(similarity=probs, threshold=1.0, evict=lru)", "buddy", "hobbit(threshold=0.5)",
            "hobbit(bits=8, threshold=1.0)"]


def _size(name: str) -> dict[str, int]:
    return {"cache_per_layer": 6} if name in ("tiny-olmoe", "tiny-qwen3-moe") else {"cache_per_layer": 3}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_both_engines_decide_alike(tmp_path: Path, name: str) -> None:
    """Record a run under the policy, replay its trace under the same spec: the same decisions."""
    size = _size(name)
    lossy = 0.0
    for spec in RT_SPECS:
        path = tmp_path / "t.jsonl.gz"
        m = record(name, PROMPTS, path, policy=spec, link=LINK, max_new_tokens=5, progress=False, **size)
        r = replay(path, spec, CacheConfig(per_layer=size["cache_per_layer"]), "rtx4090").metrics
        for key in COUNTS:
            assert r[key] == m[key], (name, spec, key, r[key], m[key])
        assert r["hits"] + r["inflight_hits"] == m["hits"] + m["inflight_hits"]
        lossy += m["dropped_mass"] + m["substituted_mass"]
    assert lossy > 0


def test_mobile_threshold_zero_is_exactly_lru_in_the_runtime() -> None:
    model, name = load_model("tiny-mixtral")
    ids = encode(model, name, "the same text for both runs")
    out = {}
    for spec in ("lru", "mobile(threshold=0)", "mobile(threshold=0.48)"):
        with offload(model, spec, cache_per_layer=3, link=LINK) as s, torch.no_grad():
            logits = model(ids).logits
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        out[spec] = (logits, gen, {k: s.metrics[k] for k in COUNTS})
    assert torch.equal(out["lru"][0], out["mobile(threshold=0)"][0]) and torch.equal(out["lru"][1], out["mobile(threshold=0)"][1])
    assert out["lru"][2] == out["mobile(threshold=0)"][2]
    assert not torch.equal(out["lru"][0], out["mobile(threshold=0.48)"][0])
    assert out["mobile(threshold=0.48)"][2]["dropped_mass"] > 0


@pytest.fixture(scope="module")
def quality_model():  # type: ignore[no-untyped-def]
    model, name = load_model("tiny-mixtral")
    ids = encode(model, name, "Offloading keeps the experts of a mixture-of-experts model in host memory.")
    model.set_experts_implementation("eager")
    return model, ids, teacher_forced(model, ids)


def _quality(model, ids, exact, spec: str):  # type: ignore[no-untyped-def]
    with offload(model, spec, cache_per_layer=3, link="emulated:1000GB/s") as s:
        logits = teacher_forced(model, ids)
    q = compare(exact, logits, ids)
    m = s.metrics
    return q.perplexity_change, q.kl, m["dropped_mass"] + m["substituted_mass"], torch.equal(logits, exact)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "grid"),
    [("mobile(threshold={})", (0, 0.3, 0.45, 0.47, 0.49, 0.5, 1.0)),
     ("substitute(threshold={})", (0, 0.3, 0.45, 0.5, 1.0)),
     ("hobbit(threshold={})", (0, 0.3, 0.45, 0.5, 1.0))],
)
def test_quality_cost_grows_with_the_threshold(quality_model, family: str, grid: tuple[float, ...]) -> None:  # type: ignore[no-untyped-def]
    """On a random-weight tiny model the perplexity change has either sign (dropping an expert of a
    model that routes like noise may as well help), so the monotone cost checked is the KL divergence
    from the exact model's next-token distributions, with the lossy routing mass; at threshold 0
    the run is exact (perplexity change 0, identical logits)."""
    model, ids, exact = quality_model
    rows = [_quality(model, ids, exact, family.format(t)) for t in grid]
    dppl, kl, mass, equal = rows[0]
    assert dppl == 0 and kl == 0 and mass == 0 and equal
    kls, masses = [r[1] for r in rows], [r[2] for r in rows]
    assert all(a <= b for a, b in zip(kls, kls[1:], strict=False)), (family, kls)
    assert all(a <= b for a, b in zip(masses, masses[1:], strict=False)), (family, masses)
    assert kls[-1] > 0 and rows[-1][0] != 0


def test_hobbit_moves_quantised_bytes_in_the_runtime() -> None:
    model, name = load_model("tiny-qwen2-moe")
    ids = encode(model, name, "a prompt long enough to miss a few experts")
    res = {}
    for spec in ("lru", "hobbit(threshold=0.5)", "hobbit(bits=8, threshold=0.5)", "hobbit(threshold=1.0)"):
        upgrades = []
        with offload(model, spec, cache_per_layer=3, link=LINK) as s, torch.no_grad():
            s.on_layer = lambda ev: upgrades.extend(ld for ld in ev.plan.loads if ld.victim == ld.key)  # noqa: B023
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
            moved = s.link.bytes_moved
            low = [s.store.low[k].numel() for k in list(s.store.low)[:1]]
            full = s.store.buffers[(0, 0)].numel() * s.store.buffers[(0, 0)].element_size()
        res[spec] = (s.metrics, moved, upgrades, low, full, s.costs.variant_bytes)
    lru_m, lru_moved, *_ = res["lru"]
    assert lru_moved == lru_m["bytes_h2d"]  # full copies: the nominal bytes are the real ones
    for spec in ("hobbit(threshold=0.5)", "hobbit(bits=8, threshold=0.5)", "hobbit(threshold=1.0)"):
        m, moved, upgrades, low, full, vb = res[spec]
        bits = 8 if "bits=8" in spec else 4
        assert vb == {"full": full, "low": full * bits // 32}  # fp32 tiny model: bits / 32
        assert m["bytes_h2d"] < lru_m["bytes_h2d"] and moved < lru_moved
        assert vb["low"] < low[0] < vb["low"] * 1.1 + 64  # the scales ride along
    assert res["hobbit(threshold=0.5)"][2]  # a low copy was upgraded in place at least once


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_quantised_copies_round_trip(bits: int, dtype: str, transposed: bool) -> None:
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(bits)
    shapes = [(48, 100), (100, 24), (48,)] if not transposed else [(100, 48), (24, 100), (48,)]
    parts = [torch.randn(s, generator=g).to(dt) for s in shapes]
    q = Quantizer(shapes, dt, bits, transposed)
    buf = q.quantize(parts)
    full = sum(p.numel() * p.element_size() for p in parts)
    assert buf.dtype == torch.uint8 and buf.numel() < full * (bits + 2) / (8 * parts[0].element_size())
    out = [torch.full(s, float("nan"), dtype=dt) for s in shapes]
    q.dequantize(buf, out)
    for p, o in zip(parts[:2], out[:2], strict=True):
        err = float((p.float() - o.float()).abs().max() / p.float().abs().max())
        assert err < (0.015 if bits == 8 else 0.1), err
    assert torch.equal(out[2], parts[2])  # biases travel at full precision


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_low_precision_copies(tmp_path: Path) -> None:
    """On the copy stream the quantised bytes land and are dequantised before the copy's event: every
    slot holding a low copy holds exactly what dequantising on the CPU gives, and the recorded run
    replays with the same counts."""
    spec = "hobbit(threshold=0.5)"
    path = tmp_path / "cuda.jsonl.gz"
    m = record("tiny-mixtral", PROMPTS, path, policy=spec, link="cuda", device="cuda", max_new_tokens=5, progress=False,
               cache_per_layer=3)
    r = replay(path, spec, CacheConfig(per_layer=3), "rtx4090").metrics
    assert all(r[k] == m[k] for k in COUNTS) and m["bytes_h2d"] > 0
    model, name = load_model("tiny-mixtral", device="cuda")
    ids = encode(model, name, "low precision on the device").cuda()
    with offload(model, spec, cache_per_layer=3, link="cuda") as s, torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        low = [(k, slot) for k, slot in s.pool.slot_of.items() if s.pool.variant[slot] == "low"]
        assert low
        for key, slot in low:
            views = [torch.empty_like(v, device="cpu") for v in s.pool.views[slot]]
            s.store.quantizer.dequantize(s.store.low[key], views)
            for v, dev in zip(views, s.pool.views[slot], strict=True):
                torch.testing.assert_close(dev.cpu(), v, rtol=1e-6, atol=1e-7)
