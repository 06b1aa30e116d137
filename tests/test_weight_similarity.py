"""Substitution by the similarity of the experts' weights: the header's `model.expert_similarity`
(its shape checks and its absence), `substitute(similarity=weights)` on a hand-made spec, the replay
that refuses a trace without the matrix, and the runtime, which computes the matrix, records it, and
decides exactly as a replay of its trace does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lab.cache import CacheConfig
from policies import Counters, ExpertCache, LayerRequest, PolicySpecError, apply_plan, make_policy
from policies.costs import variant_bytes
from sim.replay import ReplayError, replay
from traces.io import TraceError, TraceReader
from traces.schema import Header, ModelSpec
from traces.synthetic import iid_calls, toy_model, write_trace

ROOT = Path(__file__).resolve().parent.parent
COUNTS = ("accesses", "misses", "bytes_h2d", "prefetches", "layer_calls", "steps", "dropped_mass", "substituted_mass")
SPEC = "substitute(threshold=0.5, similarity=weights)"


def _matrix(n: int, pairs: dict[tuple[int, int], float]) -> list[list[float]]:
    """A symmetric n x n similarity with a unit diagonal, 0 except the given pairs."""
    m = np.eye(n)
    for (a, b), v in pairs.items():
        m[a, b] = m[b, a] = v
    return m.tolist()


def _with_similarity(model: ModelSpec, sim: Any) -> ModelSpec:
    return ModelSpec.model_validate({**model.model_dump(), "expert_similarity": sim})


# -- the header field ---------------------------------------------------------------------------------
def test_the_field_is_optional_and_absent_from_dumps_without_it() -> None:
    model = toy_model(num_layers=2, num_experts=4, top_k=2)
    assert model.expert_similarity is None
    assert "expert_similarity" not in model.model_dump() and "expert_similarity" not in model.model_dump_json()
    with_sim = _with_similarity(model, [_matrix(4, {}), _matrix(4, {(0, 1): 0.5})])
    assert with_sim.model_dump()["expert_similarity"][1][0] == [1.0, 0.5, 0.0, 0.0]
    assert ModelSpec.model_validate_json(with_sim.model_dump_json()) == with_sim
    assert Header(model=with_sim).carries("expert_similarity") and not Header(model=model).carries("expert_similarity")
    assert not Header(model=with_sim).carries("probs")


@pytest.mark.parametrize(
    ("sim", "field", "fragment"),
    [
        ([np.eye(4).tolist()], "model.expert_similarity", "has 1 matrices, one per MoE layer expected (num_moe_layers=2)"),
        ([np.eye(4).tolist(), np.eye(4)[:3].tolist()], "model.expert_similarity[1]", "has 3 rows, num_experts=4"),
        ([np.eye(4).tolist(), [[1, 0, 0, 0], [0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]], "model.expert_similarity[1][1]",
         "has 3 entries, num_experts=4"),
        ([np.eye(4).tolist(), [[1, 0, 0, 0], [0, 1, 0, "NaN"], [0, 0, 1, 0], [0, 0, 0, 1]]], "model.expert_similarity.1.1.3",
         "finite"),
    ],
)
def test_the_reader_refuses_a_matrix_of_the_wrong_shape(tmp_path: Path, sim: Any, field: str, fragment: str) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, toy_model(num_layers=2, num_experts=4, top_k=2), iid_calls([1.0] * 4, 4, num_layers=2, top_k=2))
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    head["model"]["expert_similarity"] = sim
    path.write_text("".join(line + "\n" for line in [json.dumps(head), *lines[1:]]))
    with pytest.raises(TraceError) as exc:
        TraceReader(path)
    assert (exc.value.line, exc.value.field) == (1, field) and fragment in exc.value.message
    assert str(exc.value).startswith(f"{path}:1: {field}: ") and "\n" not in str(exc.value)


# -- the policy ---------------------------------------------------------------------------------------
def _setup(spec: str, capacity: int, sim: list[list[list[float]]] | None):  # type: ignore[no-untyped-def]
    model = toy_model(num_layers=len(sim) if sim else 2, num_experts=8, top_k=2)
    if sim is not None:
        model = _with_similarity(model, sim)
    cache = ExpertCache(capacity, model.num_moe_layers, "global")
    pol = make_policy(spec)
    pol.reset(model, cache, None)
    return pol, cache, Counters(), variant_bytes(model, pol)


def _resident(cache: ExpertCache, *keys: tuple[int, int]) -> None:
    for k in keys:
        cache.apply_load(k, None)
        cache.complete(k)


def _apply(pol, cache, counters, vb, layer: int, topk: list[list[int]], weights: list[list[float]]):  # type: ignore[no-untyped-def]
    req = LayerRequest(0, "decode", layer, np.array(topk), np.array(weights, dtype=np.float64))
    plan = pol.plan(req, cache)
    apply_plan(cache, req, plan, counters, vb)
    for k in list(cache.inflight):
        cache.complete(k)
    return plan


def test_weights_parameter_reads_the_model_spec() -> None:
    pol = make_policy("substitute(similarity=weights)")
    assert pol.spec == "substitute(threshold=0.3, similarity=weights, min_similarity=0.0, evict=lfu)"
    assert pol.uses == {"expert_similarity"} and pol.required_fields() == {"expert_similarity"}
    assert make_policy("substitute(similarity=weights)+lookahead").required_fields() == {"expert_similarity"}
    with pytest.raises(PolicySpecError, match=r"needs the experts' weight similarity \(model.expert_similarity\)"):
        _setup("substitute(similarity=weights)", 4, None)


def test_substitute_picks_the_most_weight_similar_resident_expert() -> None:
    # layer 0: expert 0 is most like 2 and 4 (0.9, a tie), then 3 (0.5), 1 (0.2); 5 is opposed to it.
    # layer 1: the same experts, other weights: 0 is most like 5
    sim = [_matrix(8, {(0, 1): 0.2, (0, 2): 0.9, (0, 3): 0.5, (0, 4): 0.9, (0, 5): -0.3}),
           _matrix(8, {(0, 1): 0.1, (0, 5): 0.7, (0, 6): 0.3})]
    pol, cache, c, vb = _setup("substitute(threshold=0.3, similarity=weights)", 10, sim)
    assert pol.stats is None  # no co-activation statistics: the similarity is fixed
    _resident(cache, (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 1), (1, 5), (1, 6))
    # 0 is missing with share 0.2 < 0.3: 2 and 4 tie at 0.9, the lower id wins
    plan = _apply(pol, cache, c, vb, 0, [[3, 0]], [[0.8, 0.2]])
    assert plan.topk.tolist() == [[3, 2]] and not plan.loads and plan.substituted_mass == pytest.approx(0.2)
    # the token already runs 2: the next most similar, 4
    plan = _apply(pol, cache, c, vb, 0, [[2, 0]], [[0.8, 0.2]])
    assert plan.topk.tolist() == [[2, 4]]
    # another layer, its own matrix
    plan = _apply(pol, cache, c, vb, 1, [[6, 0]], [[0.9, 0.1]])
    assert plan.topk.tolist() == [[6, 5]]
    # an important miss (share 0.5) is loaded, whatever the similarity
    plan = _apply(pol, cache, c, vb, 1, [[6, 7]], [[0.5, 0.5]])
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(1, 7)]
    assert c.substituted_mass == pytest.approx(0.2 + 0.2 + 0.1)


def test_weight_substitutes_must_be_similar_enough() -> None:
    sim = [_matrix(8, {(0, 2): 0.4, (0, 5): -0.3}), _matrix(8, {})]
    pol, cache, c, vb = _setup("substitute(threshold=0.3, similarity=weights)", 6, sim)
    _resident(cache, (0, 3), (0, 5))
    # 5 is opposed to 0 (-0.3 <= min_similarity 0), 3 orthogonal (0): loaded, not substituted
    plan = _apply(pol, cache, c, vb, 0, [[3, 0]], [[0.8, 0.2]])
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 0)]
    pol, cache, c, vb = _setup("substitute(threshold=0.3, similarity=weights, min_similarity=0.5)", 6, sim)
    _resident(cache, (0, 2), (0, 3))
    plan = _apply(pol, cache, c, vb, 0, [[3, 0]], [[0.8, 0.2]])  # 2 (0.4) is not above 0.5
    assert plan.topk is None and [ld.key for ld in plan.loads] == [(0, 0)]


# -- the simulator ------------------------------------------------------------------------------------
def _trace(path: Path, sim: Any = None) -> Path:
    model = toy_model(num_layers=2, num_experts=8, top_k=2)
    if sim is not None:
        model = _with_similarity(model, sim)
    write_trace(path, model, iid_calls([1.0] * 8, 40, num_layers=2, top_k=2, seed=2))
    return path


def test_replay_refuses_a_trace_without_the_matrix(tmp_path: Path) -> None:
    bare = _trace(tmp_path / "bare.jsonl")
    with pytest.raises(ReplayError, match="needs the trace field.s. expert_similarity, which this trace does not carry"):
        replay(bare, SPEC, CacheConfig(experts=6))
    proc = subprocess.run([sys.executable, "-m", "sim.replay", str(bare), "--policy", SPEC, "--cache-experts", "6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sim.replay: error: ") and "expert_similarity" in lines[0]
    assert "python -m runtime.record" in lines[0] and "Traceback" not in proc.stderr


def test_replay_with_the_matrix_substitutes_and_leaves_it_out_of_the_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(2):
        a = rng.normal(size=(8, 8))
        m = np.corrcoef(a)  # symmetric, unit diagonal, in [-1, 1]
        np.fill_diagonal(m, 1.0)
        sims.append(m.tolist())
    path = _trace(tmp_path / "sim.jsonl.gz", sims)
    res = replay(path, SPEC, CacheConfig(experts=6))
    assert res.metrics["substituted_mass"] > 0
    assert "expert_similarity" not in res.config["model"]  # the trace's own (its sha256 is in the config)
    coact = replay(path, "substitute(threshold=0.5)", CacheConfig(experts=6)).metrics
    assert coact["substituted_mass"] != res.metrics["substituted_mass"]


# -- the runtime (the tests above run without it) ------------------------------------------------------
needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="the runtime extra (.[runtime]) is not installed",
)
LINK = "emulated:200GB/s"
PROMPTS = ["offloading experts", "a second, longer prompt about caches"]
PER_LAYER = {"tiny-mixtral": 3, "tiny-olmoe": 6, "zoo:coarse": 2}


def _reference(model: Any) -> np.ndarray:
    """The cosine of the experts' concatenated weights, computed another way (numpy, float64)."""
    from runtime.offload import _expert_parts, find_moe_layers

    out = []
    for ly in find_moe_layers(model):
        ex = ly.experts
        n = int(ex.num_experts)
        v = np.concatenate([getattr(ex, p).detach().double().reshape(n, -1).numpy() for p in _expert_parts(ex)], axis=1)
        norm = np.linalg.norm(v, axis=1)
        out.append((v @ v.T) / np.outer(norm, norm))
    return np.array(out)


@needs_runtime
@pytest.mark.parametrize("name", sorted(PER_LAYER))
def test_both_engines_substitute_alike_by_weight_similarity(tmp_path: Path, name: str) -> None:
    """Record a run under substitute(similarity=weights), replay its trace under the same spec: the
    same decisions, from the same matrix, which is the cosine of the experts' weights."""
    from runtime.models import load_model
    from runtime.offload import OffloadSession
    from runtime.record import record

    k = PER_LAYER[name]
    path = tmp_path / "t.jsonl.gz"
    m = record(name, PROMPTS, path, policy=SPEC, link=LINK, max_new_tokens=6, cache_per_layer=k, progress=False)
    r = replay(path, SPEC, CacheConfig(per_layer=k), "rtx4090").metrics
    for key in COUNTS:
        assert r[key] == m[key], (name, key, r[key], m[key])
    assert r["hits"] + r["inflight_hits"] == m["hits"] + m["inflight_hits"]
    assert m["substituted_mass"] > 0

    header = TraceReader(path).header.model
    sim = np.array(header.expert_similarity)
    model, _ = load_model(name)
    assert sim.shape == (header.num_moe_layers, header.num_experts, header.num_experts)
    assert np.array_equal(sim, sim.transpose(0, 2, 1)) and all((np.diagonal(s) == 1.0).all() for s in sim)
    assert np.allclose(sim, _reference(model), rtol=0, atol=1e-12)
    # the policy in the runtime got the very numbers the header carries
    session = OffloadSession(model, SPEC, cache_per_layer=k, link=LINK)
    assert session.spec.expert_similarity == header.expert_similarity
    assert session.spec.model_dump(exclude={"expert_similarity"}) == header.model_dump(exclude={"expert_similarity"})


@needs_runtime
def test_coarse_weight_similarity_chooses_otherwise_than_coactivation(tmp_path: Path) -> None:
    from runtime.record import record

    path = tmp_path / "t.jsonl.gz"
    record("zoo:coarse", PROMPTS, path, policy=SPEC, link=LINK, max_new_tokens=6, cache_per_layer=2, progress=False)
    by_weights = replay(path, SPEC, CacheConfig(per_layer=2), "rtx4090").metrics
    by_coactivation = replay(path, "substitute(threshold=0.5)", CacheConfig(per_layer=2), "rtx4090").metrics
    assert (by_weights["misses"], by_weights["substituted_mass"]) != (by_coactivation["misses"], by_coactivation["substituted_mass"])


@needs_runtime
def test_computed_only_when_read_or_recorded(tmp_path: Path) -> None:
    from runtime import offload
    from runtime.models import load_model
    from runtime.offload import expert_similarity, find_moe_layers
    from runtime.record import record

    model, _ = load_model("tiny-mixtral")
    with offload(model, "lru", cache_per_layer=3, link=LINK) as s:
        assert s.spec.expert_similarity is None
    with offload(model, SPEC, cache_per_layer=3, link=LINK) as s:
        assert s.spec.expert_similarity is not None
    # the recorder writes it by default (any recorded trace replays under similarity=weights) ...
    record("tiny-mixtral", PROMPTS[:1], tmp_path / "a.jsonl", policy="lru", cache_per_layer=3, link=LINK, max_new_tokens=2,
           progress=False)
    assert TraceReader(tmp_path / "a.jsonl").header.carries("expert_similarity")
    assert replay(tmp_path / "a.jsonl", SPEC, CacheConfig(per_layer=3)).metrics["accesses"] > 0
    # ... but not with signals=False (what validation measures), unless the policy reads it
    record("tiny-mixtral", PROMPTS[:1], tmp_path / "b.jsonl", policy="lru", cache_per_layer=3, link=LINK, max_new_tokens=2,
           progress=False, signals=False)
    assert TraceReader(tmp_path / "b.jsonl").header.model.expert_similarity is None
    # the chunked float64 sums do not depend on the chunk
    layers = find_moe_layers(model)
    assert np.allclose(expert_similarity(layers, chunk=1000), expert_similarity(layers), rtol=0, atol=1e-13)
