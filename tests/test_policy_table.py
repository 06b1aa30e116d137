"""bench/policy_table.py: every built-in policy is in the comparison (a new one with no edit to a list), and on the trained zoo models
the quality cost of a lossy policy is measured and grows with its threshold (about 15 s)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_policy_table", ROOT / "bench" / "policy_table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_registered_policy_is_compared() -> None:
    from policies import REGISTRY, make_policy
    from policies.base import is_builtin

    mod = _bench()
    mod.check_coverage(mod.SPECS)
    builtin = {n for n, c in REGISTRY.items() if is_builtin(c)}
    assert builtin <= {name for s in mod.SPECS for name, _ in mod.parse_spec(s)}
    with pytest.raises(SystemExit, match="leaves out the registered policies buddy"):
        mod.check_coverage([s for s in mod.SPECS if not s.startswith("buddy")])
    # a policy that no hand-picked variant names is compared in its default form: no hand list to edit
    specs = mod.all_specs([s for s in mod.VARIANTS if not s.startswith("buddy")])
    assert "buddy" in specs and "s3fifo" in specs and specs[0] == "lru"
    kinds = [make_policy(s).lossless for s in specs]
    assert kinds == sorted(kinds, reverse=True), "lossless specs first, then the lossy ones"


@pytest.mark.parametrize("name", ["coarse", "fine"])
def test_mobile_quality_cost_is_monotone_on_a_zoo_model(name: str) -> None:
    """`mobile` on held-out text (one block of 128 tokens, one decode call per token): threshold 0 is
    the exact model; the dropped routing mass and the KL divergence from the exact model grow with
    the threshold while the misses fall; at the largest threshold perplexity is worse than exact, by
    more than twice the standard error of the per-token log-likelihood change."""
    torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
    pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")
    mod = _bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, tokens, ppl_exact = mod.quality_rows(name, mod.QUALITY_MODELS[name], 1,
                                                   {"mobile(threshold={})": (0, 0.2, 0.35, 0.5)}, block=128)
    finally:
        torch.set_num_threads(threads)
    assert tokens == 127 and 1 < ppl_exact < 200
    lru, grid = rows[0], rows[1:]
    assert [r["spec"] for r in grid] == ["mobile(threshold=0)", "mobile(threshold=0.2)", "mobile(threshold=0.35)", "mobile(threshold=0.5)"]
    zero = grid[0]
    assert zero["quality"].perplexity_change == 0 and zero["quality"].kl == 0
    assert zero["metrics"]["misses"] == lru["metrics"]["misses"] and zero["metrics"]["dropped_mass"] == 0
    dropped = [r["metrics"]["dropped_mass"] for r in grid]
    kls = [r["quality"].kl for r in grid]
    misses = [r["metrics"]["misses"] for r in grid]
    assert all(a < b for a, b in zip(dropped, dropped[1:], strict=False)), dropped
    assert all(a < b for a, b in zip(kls, kls[1:], strict=False)), kls
    assert all(a > b for a, b in zip(misses, misses[1:], strict=False)), misses
    top = grid[-1]["quality"]
    assert top.perplexity_change > 0
    assert top.nll_change > 2 * top.nll_change_se, (top.nll_change, top.nll_change_se)
