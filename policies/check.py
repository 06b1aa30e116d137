"""The conformance suite: run a policy through the cases that break policies, and say which failed.

    python -m policies.check SPEC [SPEC ...] [--plugin MODULE] [--no-engines] [--list]

Each case runs the policy on a synthetic trace that carries every signal a policy may read (router
probabilities, look-ahead, token importance, the experts' weight similarity), with prefill calls
that need more experts than the cache holds, through the counting loop both engines share
(`policy.plan`, then `apply_plan`, which checks the plan against the contract and tells the policy
every change):

- `spec`: the policy's canonical spec builds the same policy again (results name it by that spec);
- `prefill-larger-than-cache[global|per_layer]`: prefill calls of more distinct experts than the
  partition has slots (`make_room`'s forced streaming path);
- `smallest-cache[global|per_layer]`: the smallest cache a replay accepts (top_k slots);
- `roomy-cache[global|per_layer]`: half of the experts cached;
- `determinism`: two runs from fresh policies make the same plans, call by call;
- `timing`: copies that land late (prefetches still in flight at the next calls) change no decision:
  the simulator and the runtime time copies differently, and must decide the same;
- `simulator`: the SimPy engine counts what the counting loop counts (`sim.conformance`);
- `runtime`: a real (tiny) model offloaded under the policy counts what the simulator predicts
  (`runtime.conformance`, only where torch is installed).

The last two run engines, which live above this package: they are imported only when run, and are
left out with `--no-engines` (policies/ itself imports neither simpy nor torch). Exit status 0 when
every case passes, 1 when one fails (one line per case), 2 for a bad spec or plugin.

In pytest: `policies.check.assert_conforms(spec)` raises `AssertionError` naming the failed cases;
tests/test_conformance.py runs it over every registered policy, so a new policy is checked for free.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies.base import Policy, PolicyLike, PolicySpecError, as_policy, make_policy, names
from policies.cache import ExpertCache
from policies.plan import Counters, LayerPlan, apply_plan
from policies.request import LayerRequest
from traces.schema import Fields, Header, LayerRecord, ModelSpec, Recording, StepRecord

LAYERS, EXPERTS, TOP_K = 3, 8, 2


class CaseFailed(Exception):
    """A case's finding (not a crash of the suite)."""


class Skip(Exception):  # noqa: N818  (a case that cannot run here, not an error)
    """A case that cannot run here (its engine is not installed)."""


@dataclass
class Outcome:
    case: str
    ok: bool
    detail: str = ""
    skipped: bool = False


@dataclass
class Report:
    spec: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def lines(self) -> list[str]:
        out = []
        for o in self.outcomes:
            mark = "skip" if o.skipped else ("ok" if o.ok else "FAIL")
            out.append(f"{mark:4}  {self.spec}  {o.case}" + (f": {o.detail}" if o.detail else ""))
        return out


# -- the workload ---------------------------------------------------------------------------------
def model_spec() -> ModelSpec:
    """A small model with every header signal (the experts' weight similarity)."""
    rng = np.random.default_rng(7)
    sims = []
    for _ in range(LAYERS):
        a = rng.uniform(-1, 1, (EXPERTS, EXPERTS))
        s = (a + a.T) / 2
        np.fill_diagonal(s, 1.0)
        sims.append(s.round(6).tolist())
    return ModelSpec(
        name="conformance", arch="mixtral", num_layers=LAYERS, moe_layers=list(range(LAYERS)), num_experts=EXPERTS,
        top_k=TOP_K, hidden_size=64, moe_intermediate_size=128, dtype="bf16", expert_bytes=4 << 20,
        dense_bytes=64 << 20, expert_similarity=sims,
    )


def header(model: ModelSpec | None = None) -> Header:
    return Header(model=model or model_spec(), recording=Recording(prompt_source="policies.check"),
                  fields=Fields(probs=True, lookahead=True, importance=True))


def records(seed: int = 0, prompts: int = 2, prefill_tokens: int = 12, decode_steps: int = 24) -> list[LayerRecord | StepRecord]:
    """Prompts of `prefill_tokens` tokens (calls of up to all 8 experts of a layer), each followed by
    `decode_steps` one-token steps with skewed routing; every record carries probs, a look-ahead of
    the later layers (the router's choice there, perturbed) and token importance."""
    rng = np.random.default_rng(seed)
    skew = np.linspace(2.0, 0.0, EXPERTS)
    out: list[LayerRecord | StepRecord] = []
    step = 0
    for _ in range(prompts):
        for phase, tokens in [("prefill", prefill_tokens)] + [("decode", 1)] * decode_steps:
            logits = rng.normal(size=(LAYERS, tokens, EXPERTS)) + rng.permutation(skew)
            probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            topk = np.argsort(-probs, axis=-1, kind="stable")[..., :TOP_K]
            for layer in range(LAYERS):
                p = probs[layer]
                ids = topk[layer]
                w = np.take_along_axis(p, ids, -1)
                w = w / w.sum(-1, keepdims=True)
                look = {}
                for later in range(layer + 1, LAYERS):  # the later router's choice, a quarter of rows guessed wrong
                    look[str(later)] = [
                        rng.choice(EXPERTS, TOP_K, replace=False).tolist() if rng.random() < 0.25 else row
                        for row in topk[later].tolist()
                    ]
                out.append(LayerRecord(
                    step=step, phase=phase, layer=layer, tokens=tokens, topk=ids.tolist(), weights=w.round(6).tolist(),
                    probs=p.round(6).tolist(), lookahead=look or None, importance=rng.uniform(0, 1, tokens).round(6).tolist(),
                ))
            out.append(StepRecord(step=step, phase=phase, seq_ids=[0]))
            step += 1
    return out


def request_of(rec: LayerRecord) -> LayerRequest:
    look = None if rec.lookahead is None else {int(k): v for k, v in rec.lookahead.items()}
    return LayerRequest(rec.step, rec.phase, rec.layer, rec.topk, rec.weights, rec.probs, look, rec.importance)


# -- the counting loop ----------------------------------------------------------------------------
def _costs(model: ModelSpec, pol: Policy) -> Any:
    from lab.hardware import load_profile  # below policies' callers, above nothing: torch- and simpy-free
    from policies.costs import variant_bytes

    return load_profile("rtx4090").cost_model(model, variant_bytes(model, pol))


def _future(recs: list[LayerRecord | StepRecord]) -> Any:
    from policies.base import Future

    return Future.from_records(recs)


def _plan_key(plan: LayerPlan) -> tuple[Any, ...]:
    topk = None if plan.topk is None else plan.topk.tolist()
    return (
        tuple(plan.execute), tuple(plan.order), tuple((ld.key, ld.victim, ld.variant) for ld in plan.loads),
        tuple((ld.key, ld.victim, ld.variant) for ld in plan.prefetch), tuple(plan.cpu), topk,
        round(plan.dropped_mass, 12), round(plan.substituted_mass, 12),
    )


def count(
    policy: PolicyLike, cache: ExpertCache, recs: list[LayerRecord | StepRecord], model: ModelSpec, *, lag: int = 0,
) -> tuple[Counters, list[tuple[Any, ...]]]:
    """Run the policy over the records without a clock: urgent loads land before the next call (a call
    waits for them in both engines), prefetches `lag` calls later. Returns the counters and every
    plan, for comparisons."""
    pol = as_policy(policy)
    costs = _costs(model, pol)
    pol.reset(model, cache, costs, _future(recs) if pol.wants_future() else None)
    counters = Counters()
    plans: list[tuple[Any, ...]] = []
    in_flight: list[tuple[int, Any]] = []  # (call index it lands after, key)
    calls = 0
    for rec in recs:
        if isinstance(rec, StepRecord):
            pol.observe(rec.step)
            continue
        for _, key in [x for x in in_flight if x[0] <= calls]:
            cache.complete(key)
        in_flight = [x for x in in_flight if x[0] > calls]
        req = request_of(rec)
        plan = pol.plan(req, cache)
        plans.append(_plan_key(plan))
        apply_plan(cache, req, plan, counters, costs.variant_bytes, pol)
        for ld in plan.loads:
            cache.complete(ld.key)
        for ld in plan.prefetch:
            if lag:
                in_flight.append((calls + lag, ld.key))
            else:
                cache.complete(ld.key)
        calls += 1
    return counters, plans


def _cache(model: ModelSpec, partition: str, slots: int) -> ExpertCache:
    """`slots` in all (global) or in every layer (per_layer), as `--cache-experts` / `--cache-per-layer`."""
    n = model.num_moe_layers
    return ExpertCache(slots if partition == "global" else slots * n, n, partition)  # type: ignore[arg-type]


_PLAN_FIELDS = ("execute", "order", "loads", "prefetch", "cpu", "topk", "dropped_mass", "substituted_mass")


def _first_difference(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]], recs: list[Any]) -> str:
    layer_recs = [r for r in recs if isinstance(r, LayerRecord)]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            r = layer_recs[i]
            j = next(j for j in range(len(x)) if x[j] != y[j])
            return f"layer call {i} (step {r.step}, layer {r.layer}): {_PLAN_FIELDS[j]} {x[j]} in one run, {y[j]} in the other"
    return f"the number of plans ({len(a)} and {len(b)})"


# -- the cases ------------------------------------------------------------------------------------
Case = Callable[[Callable[[], Policy]], str | None]
CASES: dict[str, Case] = {}
ENGINE_CASES = {"simulator": "sim.conformance", "runtime": "runtime.conformance"}


def case(name: str) -> Callable[[Case], Case]:
    def deco(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return deco


@case("spec")
def _spec(fresh: Callable[[], Policy]) -> str | None:
    pol = fresh()
    try:
        again = make_policy(pol.spec)
    except PolicySpecError as exc:
        raise CaseFailed(f"its canonical spec {pol.spec!r} does not build: {exc}") from None
    if again.spec != pol.spec or type(again) is not type(pol):
        raise CaseFailed(f"its canonical spec {pol.spec!r} builds {type(again).__name__} {again.spec!r}")
    return None


def _run_case(partition: str, per_layer: int) -> Case:
    def run(fresh: Callable[[], Policy]) -> str | None:
        model = model_spec()
        recs = records()
        c, _ = count(fresh(), _cache(model, partition, per_layer), recs, model)
        if c.accesses + c.cpu_experts == 0:
            raise CaseFailed("the policy ran no expert at all")
        return f"{c.layer_calls} calls, hit rate {c.hit_rate:.3f}, {c.misses} misses" + (
            f", {c.cpu_experts} experts on the CPU" if c.cpu_experts else "")

    return run


ROOMY = {"global": LAYERS * EXPERTS // 2, "per_layer": EXPERTS // 2}
for _part in ("global", "per_layer"):
    # a prefill call needs up to all 8 experts of a layer: more than 6 slots in all, or 3 per layer
    CASES[f"prefill-larger-than-cache[{_part}]"] = _run_case(_part, EXPERTS - 2 if _part == "global" else TOP_K + 1)
    CASES[f"smallest-cache[{_part}]"] = _run_case(_part, TOP_K)
    CASES[f"roomy-cache[{_part}]"] = _run_case(_part, ROOMY[_part])


@case("determinism")
def _determinism(fresh: Callable[[], Policy]) -> str | None:
    model = model_spec()
    recs = records(seed=1)
    runs = [count(fresh(), _cache(model, "global", ROOMY["global"]), recs, model) for _ in range(2)]
    (c1, p1), (c2, p2) = runs
    if p1 != p2:
        raise CaseFailed(f"two runs from fresh policies differ at {_first_difference(p1, p2, recs)}")
    return None


@case("timing")
def _timing(fresh: Callable[[], Policy]) -> str | None:
    model = model_spec()
    recs = records(seed=2)
    c1, p1 = count(fresh(), _cache(model, "global", ROOMY["global"]), recs, model, lag=0)
    c2, p2 = count(fresh(), _cache(model, "global", ROOMY["global"]), recs, model, lag=LAYERS + 1)
    if p1 != p2:
        raise CaseFailed(f"prefetches landing later change the plans at {_first_difference(p1, p2, recs)}")
    return None


def _engine_case(name: str) -> Case:
    def run(fresh: Callable[[], Policy]) -> str | None:
        try:
            mod = importlib.import_module(ENGINE_CASES[name])
        except ImportError as exc:
            raise Skip(f"{ENGINE_CASES[name]} is not importable here ({exc})") from None
        return mod.check(fresh)  # type: ignore[no-any-return]

    return run


for _name in ENGINE_CASES:
    CASES[_name] = _engine_case(_name)


# -- running --------------------------------------------------------------------------------------
def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""


def run_checks(policy: PolicyLike, *, engines: bool = True, cases: list[str] | None = None) -> Report:
    """Every case (or those named) on `policy`; each case starts from a fresh copy of it."""
    import copy

    first = as_policy(policy)
    template = copy.deepcopy(first)

    def fresh() -> Policy:
        return copy.deepcopy(template)

    report = Report(first.spec)
    for name, fn in CASES.items():
        if cases is not None and name not in cases:
            continue
        if not engines and name in ENGINE_CASES:
            continue
        try:
            detail = fn(fresh)
            report.outcomes.append(Outcome(name, True, detail or ""))
        except Skip as exc:
            report.outcomes.append(Outcome(name, True, f"skipped: {exc}", skipped=True))
        except CaseFailed as exc:
            report.outcomes.append(Outcome(name, False, str(exc)))
        except Exception as exc:  # the policy broke the contract or crashed: the case names it
            msg = " ".join(str(exc).split()) or "(no message)"
            report.outcomes.append(Outcome(name, False, f"{type(exc).__name__}: {msg}{_where(exc)}"))
    return report


def assert_conforms(policy: PolicyLike, *, engines: bool = True, cases: list[str] | None = None) -> Report:
    """For pytest: raise AssertionError naming every failed case."""
    report = run_checks(policy, engines=engines, cases=cases)
    if not report.ok:
        raise AssertionError("; ".join(f"case {o.case}: {o.detail}" for o in report.failed))
    return report


def build_parser() -> argparse.ArgumentParser:
    from traces.cli import OneLineParser

    p = OneLineParser(prog="python -m policies.check", description="Run a policy through the conformance cases.")
    p.add_argument("spec", nargs="*", help="policy spec(s), as in every CLI (default with --all: every registered policy)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (or a .py file) that registers policies first; repeatable")
    p.add_argument("--all", action="store_true", help="check every registered policy (built-in, plugins, entry points)")
    p.add_argument("--no-engines", action="store_true", help="leave out the simulator and runtime cases")
    p.add_argument("--case", action="append", metavar="NAME", help=f"run only this case; repeatable; known: {', '.join(CASES)}")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from policies.plugins import PluginError, load_plugins

    args = build_parser().parse_args(argv)
    prog = "policies.check"
    if args.list:
        for name in CASES:
            print(name)
        return 0
    unknown = [c for c in args.case or [] if c not in CASES]
    if unknown:
        print(f"{prog}: error: unknown case {unknown[0]!r}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        specs = list(args.spec)
        if args.all:
            from policies.base import available

            specs += [n for n in available() if n not in specs]
        if not specs:
            print(f"{prog}: error: give a policy spec (or --all); known: {', '.join(names())}", file=sys.stderr)
            return 2
        for s in specs:
            make_policy(s)
    except (PluginError, PolicySpecError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for s in specs:
        report = run_checks(s, engines=not args.no_engines, cases=args.case)
        for line in report.lines():
            print(line)
        failed += len(report.failed)
    print(f"{prog}: {len(specs)} policies, {failed} failed case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
