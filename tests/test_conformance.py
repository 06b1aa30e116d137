"""The policy contract checks itself: every registered policy passes `policies.check` (a new policy is
checked for free), broken policies fail it naming the case, the engines tell a policy every change
(forced streaming included) and an invalid plan is a `PlanError` naming the policy and the rule."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from policies import (
    REGISTRY,
    DemandPolicy,
    ExpertCache,
    LayerPlan,
    Load,
    PlanError,
    apply_plan,
    available,
    register,
)
from policies.check import CASES, assert_conforms, run_checks
from policies.plan import Counters
from policies.request import LayerRequest
from traces.synthetic import toy_model

ROOT = Path(__file__).resolve().parent.parent
NO_RUNTIME = [c for c in CASES if c != "runtime"]


@pytest.mark.parametrize("name", sorted(available()))
def test_every_registered_policy_conforms(name: str) -> None:
    """Every case but the runtime one (tested below on a few policies: it runs a real model)."""
    report = assert_conforms(name, cases=NO_RUNTIME)
    assert [o.case for o in report.outcomes] == NO_RUNTIME


@pytest.mark.parametrize("spec", ["s3fifo", "lru+lookahead"])
def test_runtime_counts_equal_the_simulators(spec: str) -> None:
    pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
    pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")
    report = assert_conforms(spec, cases=["runtime"])
    assert "equal in both engines" in report.outcomes[0].detail


# -- broken policies -------------------------------------------------------------------------------
@pytest.fixture
def broken():  # type: ignore[no-untyped-def]
    """Three policies that look right and are not."""

    @register("drift-test")
    class DriftFIFO(DemandPolicy):
        """FIFO on a queue of its own: loads join it after the plan, a victim leaves it when chosen. The
        forced streaming path evicts a key this call loaded without asking `victim`: it stays queued."""

        def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
            super().reset(model, cache, costs, future)
            self.queue: list = []

        def plan(self, req, cache):  # type: ignore[no-untyped-def]
            plan = super().plan(req, cache)
            self.queue.extend(ld.key for ld in plan.loads)
            return plan

        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            for k in self.queue:
                if k not in exclude and cache.part(k) == part:
                    self.queue.remove(k)
                    return k
            return None

    @register("dice-test")
    class Dice(DemandPolicy):
        """Evicts at random from the global generator: unseeded."""

        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            keys = [k for k in cache.least_recent(part) if k not in exclude]
            return random.choice(keys) if keys else None

    @register("clock-test")
    class Impatient(DemandPolicy):
        """Evicts a copy still in flight first: a decision on timing."""

        def plan(self, req, cache):  # type: ignore[no-untyped-def]
            plan = super().plan(req, cache)
            # prefetch the next layer's expert 0, so that copies are in flight at the next call
            key = ((req.layer + 1) % self.model.num_moe_layers, 0)
            if key not in cache and not plan.prefetch and key not in [ld.key for ld in plan.loads]:
                plan.prefetch = self.make_room(cache, [key], set(plan.execute) | {ld.key for ld in plan.loads}, force=False,
                                               after=plan.loads)
            return plan

        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            keys = [k for k in cache.least_recent(part) if k not in exclude]
            flying = [k for k in keys if k in cache.inflight]
            return (flying or keys or [None])[0]

    yield
    for n in ("drift-test", "dice-test", "clock-test"):
        del REGISTRY[n]


def test_broken_policies_fail_naming_the_case(broken) -> None:  # type: ignore[no-untyped-def]
    drift = run_checks("drift-test", engines=False)
    bad = {o.case: o.detail for o in drift.failed}
    assert "prefill-larger-than-cache[global]" in bad and "smallest-cache[per_layer]" in bad
    assert "PlanError: policy 'drift-test': layer" in bad["prefill-larger-than-cache[global]"]
    assert "evict-absent: plan evicts" in bad["prefill-larger-than-cache[global]"]
    assert "roomy-cache[global]" not in bad  # it works while no call streams
    with pytest.raises(AssertionError, match=r"case prefill-larger-than-cache\[global\]: PlanError"):
        assert_conforms("drift-test", engines=False)

    dice = {o.case: o.detail for o in run_checks("dice-test", engines=False).failed}
    assert "determinism" in dice
    assert dice["determinism"].startswith("two runs from fresh policies differ at layer call ")

    clock = {o.case: o.detail for o in run_checks("clock-test", engines=False).failed}
    assert "timing" in clock and "prefetches landing later change the plans" in clock["timing"]


def test_check_cli_names_the_failed_case(tmp_path: Path) -> None:
    plugin = tmp_path / "driftpol.py"
    plugin.write_text(
        "from policies import DemandPolicy, register\n"
        "@register('drift')\n"
        "class Drift(DemandPolicy):\n"
        "    '''Evicts a key it never held.'''\n"
        "    def victim(self, cache, part, exclude):\n"
        "        return (part, 7) if (part, 7) not in exclude else None\n"
    )
    r = subprocess.run([sys.executable, "-m", "policies.check", "drift", "--plugin", str(plugin), "--no-engines"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    fails = [x for x in r.stdout.splitlines() if x.startswith("FAIL")]
    assert fails and all("drift" in x for x in fails)
    assert any("smallest-cache[global]: PlanError: policy 'drift':" in x for x in fails), fails
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "policies.check", "lru", "--plugin", "no_such_plugin_mod"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "policies.check: error: plugin 'no_such_plugin_mod': cannot import it: no module named 'no_such_plugin_mod' "
        "(is it installed, or on PYTHONPATH?)"
    ]


def test_policies_check_imports_no_engine() -> None:
    code = "import sys, policies.check, policies.plugins; print(sorted({'simpy', 'torch', 'sim'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# -- the hooks --------------------------------------------------------------------------------------
def test_hooks_keep_a_policys_own_state_in_step_with_the_cache() -> None:
    """A policy that tracks membership only through the hooks holds exactly the cache's keys before
    every plan, through prefill calls that stream through a cache smaller than them."""
    from policies.check import _cache, count, model_spec, records

    seen: list[bool] = []

    @register("mirror-test")
    class Mirror(DemandPolicy):
        """LRU, with a mirror of the cache kept from the hooks."""

        def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
            super().reset(model, cache, costs, future)
            self.held: set = set()
            self.hits = 0

        def on_admit(self, key, variant, prefetch):  # type: ignore[no-untyped-def]
            assert key not in self.held
            self.held.add(key)

        def on_evict(self, key):  # type: ignore[no-untyped-def]
            self.held.remove(key)

        def on_access(self, key, hit):  # type: ignore[no-untyped-def]
            self.hits += hit

        def plan(self, req, cache):  # type: ignore[no-untyped-def]
            seen.append(self.held == set(cache.resident))
            return super().plan(req, cache)

        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            return next((k for k in cache.least_recent(part) if k not in exclude), None)

    try:
        model = model_spec()
        for part, slots in (("global", 6), ("per_layer", 3)):  # prefill calls need up to 8
            seen.clear()
            pol = Mirror()
            counters, _ = count(pol, _cache(model, part, slots), records(), model)
            assert seen and all(seen)
            assert pol.hits == counters.hits + counters.inflight_hits > 0
    finally:
        del REGISTRY["mirror-test"]


def test_s3fifo_queues_hold_the_cache() -> None:
    from policies.check import _cache, count, model_spec, records

    model = model_spec()
    for part, slots in (("global", 6), ("per_layer", 3), ("global", 12)):
        cache = _cache(model, part, slots)
        pol = REGISTRY["s3fifo"]()
        count(pol, cache, records(seed=5), model)
        held = [k for q in pol.q for k in (*q.s, *q.m)]
        assert sorted(held) == sorted(cache.resident) and len(held) == len(set(held))
        assert all(not (set(q.g) & set(cache.resident)) for q in pol.q)


# -- PlanError --------------------------------------------------------------------------------------
def _setup():  # type: ignore[no-untyped-def]
    model = toy_model(num_experts=4, top_k=1)
    cache = ExpertCache(2, 1, "global")
    pol = REGISTRY["lru"]()
    pol.reset(model, cache, None)
    return cache, pol


@pytest.mark.parametrize(("plan", "rule"), [
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)], loads=[Load((0, 1), (0, 3))]), "evict-absent"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)], loads=[Load((0, 1)), Load((0, 1))]), "load-twice"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)]), "run-unloaded"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)], loads=[Load((0, 1)), Load((0, 2))]), "load-unused"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 2)], loads=[Load((0, 1))]), "order"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)], loads=[Load((0, 1), None, "tiny")]), "unknown-variant"),
    (LayerPlan(execute=[(0, 1)], order=[(0, 1)], loads=[Load((0, 1))], prefetch=[Load((0, 2)), Load((0, 3))]), "no-free-slot"),
])
def test_an_invalid_plan_is_a_plan_error_naming_the_policy_and_the_rule(plan: LayerPlan, rule: str) -> None:
    from policies.plan import RULES

    cache, pol = _setup()
    req = LayerRequest(4, "decode", 0, [[1]], [[1.0]])
    with pytest.raises(PlanError) as err:
        apply_plan(cache, req, plan, Counters(), {"full": 1}, pol)
    assert err.value.rule == rule and rule in RULES
    assert str(err.value).startswith(f"policy 'lru': layer 0 step 4: {rule}: ")


def test_reusing_a_slot_of_an_expert_that_runs_later_is_refused() -> None:
    cache, pol = _setup()
    req = LayerRequest(0, "decode", 0, [[0]], [[1.0]])
    apply_plan(cache, req, pol.plan(req, cache), Counters(), {"full": 1}, pol)  # (0, 0) resident
    cache.complete((0, 0))
    req = LayerRequest(1, "prefill", 0, [[0], [1]], [[1.0], [0.5]])
    plan = LayerPlan(execute=[(0, 0), (0, 1)], order=[(0, 1), (0, 0)], loads=[Load((0, 1), (0, 0))])
    with pytest.raises(PlanError, match=r"reuse-before-run: plan loads \(0, 1\) into the slot of \(0, 0\), which runs after it"):
        apply_plan(cache, req, plan, Counters(), {"full": 1}, pol)
