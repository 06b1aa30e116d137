"""Hit-rate curves over every cache size at once: LRU, Belady (OPT) and the compulsory-miss bound.

    python -m sim.curves TRACE [--partition global|per_layer] [--max-slots N] [--out curves.json]
        [--html curves.html] [--allow-truncated] [--stack-only]

The curves count exactly what `sim.replay` counts for the policies `lru` and `belady` (`hits` over
`accesses`, DESIGN section 5), with the simulator's call semantics (DESIGN section 4): a layer call's
distinct experts, in access order, must all be resident at once; a victim is never an expert of the
same call; after the call its experts are the most recent, the first touched the least recent of them.

Why one pass is enough. Let T be the largest number of distinct experts in one layer call. For a
cache of C >= T slots (per partition), the cache after a call with need set N is
`N + best(C - |N|, cache - N)`, where `best(m, X)` keeps the m members of X that the policy ranks
highest: by recency for LRU; for Belady by next use (sooner first), ties by recency (the replay's
Belady evicts the farthest next use, ties to the least recent). The ranking does not depend on C, and
the caches of C and C + 1 slots differ by at most one key, so by induction the cache of C slots is
contained in the cache of C + 1 slots at every call (inclusion). The caches are then the prefixes of
one stack, and a key of a call hits in a cache of C slots iff its depth in the stack before the call
(0-based, counting every key above it, the call's other keys included) is below C.

- LRU: the stack is the recency order, so the depth of a key is the number of distinct keys touched
  after its previous access and before the call. It is computed for all accesses at once, offline,
  as a dominance count (`count_less`, a wavelet matrix over the accesses' previous-access positions:
  O(n log n) with numpy, no Python loop per access).
- OPT: Mattson's priority stack with Belady's priority (next use, then recency), updated per call:
  the call's keys go to the top, and walking the old stack down, each level takes the best of the
  keys displaced so far (`_opt_depths_walk` in tests/curves_reference.py, a Python step per level). `opt_depths` computes the same
  stack level by level instead: along one level the key it holds is a running maximum of what the
  level above pushes out, restarted where a call needs it, so each level is a few numpy passes over
  the calls that reach it (the walk's work, without a Python step per level and call).

Sizes below T: a call that needs more experts than the partition has slots streams them through the
slots (`DemandPolicy.make_room`'s forced path), inclusion breaks there, and those sizes (from top_k,
the smallest cache `sim.replay` accepts, to T - 1) are computed by running the `lru` and `belady`
policies themselves once per size (`--stack-only` leaves them out). Each row of the output says how
it was computed (`method`: `stack` or `simulated`).

`per_layer`: one stack per MoE layer, and the size is slots per layer (`--cache-per-layer K`).

The package, by seam: `calls` (the trace as layer calls: keys in access order), `stack` (the LRU and
OPT stack depths), and here the curves, their output and `python -m sim.curves`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lab.cache import CacheConfig
from lab.versions import TOOL
from policies import CacheError, Counters, LayerRequest, PolicyLike, PolicySpecError, apply_plan
from policies.base import Future
from sim.assembly import assemble
from sim.curves.calls import Calls, calls_from_records, read_calls
from sim.curves.stack import NEVER, Partition, count_less, hits_below, lru_depths, opt_depths
from traces.cli import OneLineParser
from traces.io import TraceError, file_digest, write_text_atomic

__all__ = [
    "NEVER", "Calls", "Curves", "Partition", "calls_from_records", "compute_curves", "count_less", "curves",
    "figure", "hits_below", "lru_depths", "main", "opt_depths", "read_calls", "simulate_hits", "table", "write_html",
]


# -- sizes the stacks do not cover: the policies themselves -----------------------------------------
def simulate_hits(calls: Calls, policy: PolicyLike, cache: CacheConfig) -> int:
    """Hits of `policy` (a demand policy: `lru`, `belady`, ...) over the calls, counted by the policy's
    own `plan` and `apply_plan`, as the simulator does, without its clock: every copy has landed before
    the next call plans, as in `sim.replay` (a demand call waits for its loads)."""
    model = calls.model
    tuples = calls.key_tuples()
    run = assemble(model, policy, cache, None, future=lambda: Future(tuples))  # counts only: no costs
    pol, ca = run.policy, run.cache
    counters = Counters()
    sizes = {"full": model.expert_bytes}
    steps = calls.steps.tolist()
    for c, need in enumerate(tuples):
        m = len(need)
        # a one-row request whose weights fall in access order reproduces the call's access order
        req = LayerRequest(steps[c], "decode", need[0][0], [[k[1] for k in need]], [[float(m - j) for j in range(m)]])
        plan = pol.plan(req, ca)
        apply_plan(ca, req, plan, counters, sizes, pol)
        for ld in plan.loads:
            ca.complete(ld.key)
    return counters.hits




@dataclass
class Curves:
    path: str
    sha256: str | None
    partition: Partition
    calls: Calls
    sizes: list[int]
    methods: list[str]
    lru: list[int]
    opt: list[int]
    distinct: int
    largest_call: int
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        n = self.calls.accesses
        rate = (lambda h: h / n) if n else (lambda h: 0.0)
        return [
            {
                "size": s,
                "method": m,
                "lru": {"hits": lh, "accesses": n, "hit_rate": rate(lh)},
                "opt": {"hits": oh, "accesses": n, "hit_rate": rate(oh)},
            }
            for s, m, lh, oh in zip(self.sizes, self.methods, self.lru, self.opt, strict=True)
        ]

    @property
    def compulsory_max_hit_rate(self) -> float:
        n = self.calls.accesses
        return 1 - self.distinct / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        model = self.calls.model
        n = self.calls.accesses
        return {
            "tool": TOOL,
            "trace": {"path": self.path, "sha256": self.sha256, "truncated": self.calls.truncated},
            "model": {
                "name": model.name,
                "num_moe_layers": model.num_moe_layers,
                "num_experts": model.num_experts,
                "top_k": model.top_k,
                "expert_bytes": model.expert_bytes,
            },
            "partition": self.partition,
            "size_unit": "slots per MoE layer" if self.partition == "per_layer" else "slots (all layers)",
            "layer_calls": self.calls.n_calls,
            "accesses": n,
            "distinct_keys": self.distinct,
            "largest_call": self.largest_call,
            "compulsory": {"misses": self.distinct, "max_hits": n - self.distinct, "max_hit_rate": self.compulsory_max_hit_rate},
            "policies": {"lru": "lru", "opt": "belady"},
            "notes": self.notes,
            "curves": self.rows(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def compute_curves(
    calls: Calls,
    partition: Partition = "global",
    max_slots: int | None = None,
    *,
    path: str = "",
    sha256: str | None = None,
    stack_only: bool = False,
) -> Curves:
    """LRU and OPT hits at every size from top_k (the smallest cache a replay accepts) to `max_slots`
    (default: the size at which every key fits, in the partition)."""
    if partition not in ("global", "per_layer"):
        raise ValueError(f"partition must be 'global' or 'per_layer', got {partition!r}")
    model = calls.model
    top_k = model.top_k
    n = calls.accesses
    largest = int(calls.call_sizes().max()) if calls.n_calls else top_k
    distinct = int(len(np.unique(calls.keys)))
    if partition == "per_layer":
        per_layer = np.bincount(np.unique(calls.keys) // model.num_experts, minlength=1)
        fits = int(per_layer.max()) if n else top_k
    else:
        fits = distinct
    hi = max(top_k, fits) if max_slots is None else max_slots
    if hi < top_k:
        raise CacheError(f"--max-slots {hi} is below top_k={top_k}: no cache that small holds one token's experts")
    first = max(top_k, largest) if stack_only else top_k
    sizes = list(range(first, hi + 1))
    stack_sizes = [s for s in sizes if s >= largest]
    small = [s for s in sizes if s < largest]
    notes = [
        f"sizes >= {largest} (the most distinct experts one layer call needs) come from one stack pass per "
        "policy; inclusion holds there"
    ]
    if small:
        notes.append(
            f"sizes {small[0]}-{small[-1]} are below {largest}: a call that needs more experts than the partition "
            "holds streams them through its slots and inclusion breaks, so each was simulated with the policy itself"
        )
    elif stack_only and largest > top_k:
        notes.append(f"sizes {top_k}-{largest - 1} left out (--stack-only)")
    lru = hits_below(lru_depths(calls, partition), stack_sizes) if stack_sizes else []
    opt = hits_below(opt_depths(calls, partition), stack_sizes) if stack_sizes else []
    lru_small, opt_small = [], []
    for s in small:
        cfg = CacheConfig(per_layer=s) if partition == "per_layer" else CacheConfig(experts=s)
        lru_small.append(simulate_hits(calls, "lru", cfg))
        opt_small.append(simulate_hits(calls, "belady", cfg))
    return Curves(
        path=path,
        sha256=sha256,
        partition=partition,
        calls=calls,
        sizes=sizes,
        methods=["simulated"] * len(small) + ["stack"] * len(stack_sizes),
        lru=lru_small + lru,
        opt=opt_small + opt,
        distinct=distinct,
        largest_call=largest,
        notes=notes,
    )


def curves(
    trace: str | os.PathLike[str],
    partition: Partition = "global",
    max_slots: int | None = None,
    *,
    allow_truncated: bool = False,
    stack_only: bool = False,
) -> Curves:
    """Read `trace` and compute its curves (see `compute_curves`)."""
    calls = read_calls(trace, allow_truncated=allow_truncated)
    res = compute_curves(calls, partition, max_slots, path=str(trace), sha256=file_digest(Path(trace)), stack_only=stack_only)
    if calls.truncated:
        res.notes.append("the trace is truncated (no footer): curves of what it holds")
    return res


# -- output ----------------------------------------------------------------------------------------
def table(res: Curves, max_rows: int = 40) -> str:
    d = res.to_dict()
    unit = "slots per layer" if res.partition == "per_layer" else "slots"
    head = [
        f"trace      {res.path} ({d['model']['name']}, {d['layer_calls']} layer calls, {d['accesses']} accesses)",
        f"partition  {res.partition} (size = {unit})",
        f"compulsory {d['distinct_keys']} distinct keys: hit rate at most {res.compulsory_max_hit_rate:.4f}",
        f"largest call {res.largest_call} distinct experts",
        "",
    ]
    rows = res.rows()
    shown = rows
    if len(rows) > max_rows:  # evenly spaced, first and last always
        idx = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
        shown = [rows[i] for i in idx]
    lines = [f"{'size':>6}  {'LRU':>8}  {'OPT':>8}  {'LRU hits':>9}  {'OPT hits':>9}  method"]
    for r in shown:
        lines.append(
            f"{r['size']:>6}  {r['lru']['hit_rate']:>8.4f}  {r['opt']['hit_rate']:>8.4f}  "
            f"{r['lru']['hits']:>9}  {r['opt']['hits']:>9}  {r['method']}"
        )
    tail = [f"({len(shown)} of {len(rows)} sizes shown; --out has all)"] if len(shown) < len(rows) else []
    return "\n".join(head + lines + tail + [""] + [f"note: {x}" for x in res.notes])


def figure(res: Curves) -> Any:
    import plotly.graph_objects as go

    rows = res.rows()
    x = [r["size"] for r in rows]
    unit = "slots per MoE layer" if res.partition == "per_layer" else "expert slots, all layers"
    fig = go.Figure()
    for name, key, colour in (("Belady (OPT)", "opt", "#2ca02c"), ("LRU", "lru", "#1f77b4")):
        fig.add_trace(
            go.Scatter(
                x=x, y=[r[key]["hit_rate"] for r in rows], name=name, mode="lines+markers" if len(x) <= 64 else "lines",
                line={"color": colour},
                customdata=[[r[key]["hits"], r[key]["accesses"], r["method"]] for r in rows],
                hovertemplate="size %{x}<br>hit rate %{y:.4f}<br>%{customdata[0]} / %{customdata[1]} (%{customdata[2]})"
                f"<extra>{name}</extra>",
            )
        )
    if x:
        bound = res.compulsory_max_hit_rate
        fig.add_trace(
            go.Scatter(
                x=[x[0], x[-1]], y=[bound, bound], name="compulsory-miss bound", mode="lines",
                line={"color": "#d62728", "dash": "dash"},
                hovertemplate=f"1 - {res.distinct} distinct / {res.calls.accesses} accesses = {bound:.4f}<extra></extra>",
            )
        )
    small = [r["size"] for r in rows if r["method"] == "simulated"]
    if small:
        fig.add_vrect(x0=small[0] - 0.5, x1=small[-1] + 0.5, fillcolor="#eee", line_width=0, layer="below",
                      annotation_text="simulated per size", annotation_position="top left")
    fig.update_layout(
        title=f"hit rate vs cache size: {Path(res.path).name}, {res.partition} partition",
        xaxis_title=f"cache size ({unit})",
        yaxis_title="hit rate",
        yaxis={"range": [0, 1.02]},
        legend_title_text="policy",
        hovermode="x unified",
    )
    return fig


def write_html(res: Curves, path: str | os.PathLike[str]) -> None:
    """A self-contained HTML file (plotly.js inlined: opens without a network)."""
    write_text_atomic(path, figure(res).to_html(include_plotlyjs=True, full_html=True))


# -- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.curves", description="LRU, Belady and compulsory hit-rate curves over every cache size.")
    p.add_argument("trace", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--partition", choices=["global", "per_layer"], default="global",
                   help="one cache shared by all layers (size = slots) or one per layer (size = slots per layer)")
    p.add_argument("--max-slots", type=int, metavar="N", help="largest size (default: where every key fits)")
    p.add_argument("--out", type=Path, help="write the curves as JSON")
    p.add_argument("--html", type=Path, help="write a plotly chart (self-contained HTML)")
    p.add_argument("--allow-truncated", action="store_true", help="use a trace that has no footer")
    p.add_argument("--stack-only", action="store_true",
                   help="leave out sizes below the largest call (they need one simulation per size)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "sim.curves"
    if args.max_slots is not None and args.max_slots < 1:
        print(f"{prog}: error: --max-slots must be at least 1, got {args.max_slots}", file=sys.stderr)
        return 2
    try:
        res = curves(args.trace, args.partition, args.max_slots, allow_truncated=args.allow_truncated,
                     stack_only=args.stack_only)
    except (TraceError, CacheError, PolicySpecError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a trace that exists but cannot be read (permissions, a device error)
        print(f"{prog}: error: cannot read {args.trace}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(table(res))
    try:
        if args.out:
            write_text_atomic(args.out, res.to_json())
            print(f"\nwrote {args.out}")
        if args.html:
            write_html(res, args.html)
            print(f"wrote {args.html}")
    except OSError as exc:
        print(f"{prog}: error: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0

