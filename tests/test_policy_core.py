"""The policy core: spec strings, the registry, the cache and the planning helper."""

from __future__ import annotations

import numpy as np
import pytest

from policies import REGISTRY, ExpertCache, LayerRequest, PolicySpecError, apply_plan, make_policy, parse_spec
from policies.plan import Counters, PlanError
from traces.synthetic import toy_model


def test_spec_parser_and_canonical_specs() -> None:
    assert parse_spec("lru+lookahead(depth=1, budget=2)") == [("lru", {}), ("lookahead", {"depth": 1, "budget": 2})]
    assert parse_spec("mobile(metric=entropy, threshold=0.6)") == [("mobile", {"metric": "entropy", "threshold": 0.6})]
    assert make_policy("lfu(decay=0.9)").spec == "lfu(decay=0.9)"
    assert make_policy("random").spec == "random(seed=0)"
    assert make_policy("static(trace=a/b.jsonl)").spec == "static(trace=a/b.jsonl, scratch=None)"
    assert {"lru", "lfu", "fifo", "random", "belady", "static"} <= set(REGISTRY)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("nope", "known: .*belady"), ("lfu(foo=1)", "no parameter 'foo'"), ("lfu(decay=2)", "decay"), ("lru(", "cannot parse"),
     ("", "empty"), ("lru+lfu", "only modifiers"), ("random(seed=x)", "seed")],
)
def test_bad_specs(spec: str, fragment: str) -> None:
    with pytest.raises(PolicySpecError, match=fragment.replace("(", r"\(")):
        make_policy(spec)


def _req(layer: int, experts: list[int], step: int = 0) -> LayerRequest:
    w = [1.0 / len(experts)] * len(experts)
    return LayerRequest(step, "decode", layer, np.array([experts]), np.array([w]))


def test_prefetch_planned_after_urgent_loads_respects_their_slots() -> None:
    """make_room(after=...): a global cache with 3 slots, 2 free, an urgent load taking one of them:
    a prefetch of two keys gets the last free slot, then must evict (never a key the call uses)."""
    model = toy_model(num_layers=2, num_experts=8, top_k=1)
    cache = ExpertCache(3, 2, "global")
    pol = make_policy("lru")
    pol.reset(model, cache, None)
    apply_plan(cache, _req(0, [5]), pol.plan(_req(0, [5]), cache), Counters(), {"full": 1})
    req = _req(0, [6])
    plan = pol.plan(req, cache)
    assert [ld.victim for ld in plan.loads] == [None]
    pre = pol.make_room(cache, [(1, 0), (1, 1)], set(plan.execute), force=False, after=plan.loads)
    assert pre[0].victim is None and pre[1].victim == (0, 5)
    plan.prefetch = pre
    apply_plan(cache, req, plan, Counters(), {"full": 1})
    assert set(cache.resident) == {(0, 6), (1, 0), (1, 1)}


def test_apply_plan_refuses_a_bad_plan() -> None:
    model = toy_model(num_experts=4, top_k=1)
    cache = ExpertCache(2, 1, "global")
    pol = make_policy("lru")
    pol.reset(model, cache, None)
    req = _req(0, [1])
    plan = pol.plan(req, cache)
    plan.loads = []  # runs an expert it never loads
    with pytest.raises(PlanError, match="without loading it"):
        apply_plan(cache, req, plan, Counters(), {"full": 1})


def test_per_layer_partition_splits_evenly_with_the_remainder_first() -> None:
    cache = ExpertCache(10, 4, "per_layer")
    assert cache.part_capacity == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="at least one slot per layer"):
        ExpertCache(3, 4, "per_layer")
