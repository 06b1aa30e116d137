"""Summary statistics of a trace: how skewed and how repetitive its routing is, i.e. how much an
expert cache could gain before any simulation.

`python -m traces.stats TRACE [--json] [--allow-truncated]`

Definitions (the tests pin them):
- steps: distinct `step` values of the layer records, by the phase of their first record; tokens: per
  step the largest `tokens` of its layer records, summed.
- access: one distinct expert of one layer record (an expert chosen by several tokens of a call is one
  access, as it is one load).
- popularity, per layer: the share of the layer's accesses that go to its most popular expert and to
  its top 25 % experts (ceil(num_experts / 4) of them), and the entropy of the access distribution over
  all `num_experts` experts divided by log(num_experts) (1 = uniform, 0 = one expert only).
- reuse distance of an access of expert e in layer L: the number of calls of layer L since the last
  call of L that used e (1 = the previous call used it too). A first use is a compulsory access and has
  no distance. Quantiles are taken over the non-compulsory accesses (nearest rank: the smallest d with at
  least q of them at distance <= d); `within_k` is the fraction of *all* accesses with distance <= k,
  which is the hit rate of a per-layer cache that keeps every expert used in the last k calls.

Streaming: memory holds per-(layer, expert) counters and a histogram of distances, never the records.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from traces.cli import OneLineParser
from traces.io import TraceError, TraceReader
from traces.schema import LayerRecord

QUANTILES = (25, 50, 75, 90)
WITHIN = (1, 2, 4)


def _quantile(hist: Counter[int], total: int, q: float) -> int | None:
    """Nearest-rank quantile of a histogram holding `total` values."""
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for d in sorted(hist):
        seen += hist[d]
        if seen >= rank:
            return d
    raise AssertionError("unreachable: rank exceeds total")


def trace_stats(path: str | Path, *, allow_truncated: bool = False) -> dict[str, Any]:
    """One pass over the trace; raises `TraceError` on a bad trace."""
    reader = TraceReader(path, allow_truncated=allow_truncated)
    spec = reader.header.model
    n_layers, n_experts = spec.num_moe_layers, spec.num_experts
    calls = [0] * n_layers
    counts = [[0] * n_experts for _ in range(n_layers)]
    last_call = [[-1] * n_experts for _ in range(n_layers)]  # index of the layer's call that last used e
    hist: Counter[int] = Counter()
    compulsory = 0
    steps = {"prefill": 0, "decode": 0}
    tokens = {"prefill": 0, "decode": 0}
    records = 0
    cur_step: int | None = None
    cur_phase = "decode"
    cur_tokens = 0

    for rec in reader:
        if not isinstance(rec, LayerRecord):
            continue
        records += 1
        if rec.step != cur_step:
            if cur_step is not None:
                tokens[cur_phase] += cur_tokens
            cur_step, cur_phase, cur_tokens = rec.step, rec.phase, 0
            steps[cur_phase] += 1
        cur_tokens = max(cur_tokens, rec.tokens)
        layer = rec.layer
        call = calls[layer]
        calls[layer] += 1
        for e in {e for row in rec.topk for e in row}:
            counts[layer][e] += 1
            prev = last_call[layer][e]
            if prev < 0:
                compulsory += 1
            else:
                hist[call - prev] += 1
            last_call[layer][e] = call
    if cur_step is not None:
        tokens[cur_phase] += cur_tokens

    top_n = max(1, math.ceil(n_experts / 4))
    layers = []
    for layer in range(n_layers):
        c = counts[layer]
        total = sum(c)
        ranked = sorted(c, reverse=True)
        norm: float | None = None
        if total:
            entropy = -sum(x / total * math.log(x / total) for x in c if x)
            norm = entropy / math.log(n_experts) if n_experts > 1 else 0.0
        layers.append(
            {
                "layer": layer,
                "calls": calls[layer],
                "accesses": total,
                "distinct_experts": sum(1 for x in c if x),
                "top1_share": ranked[0] / total if total else None,
                "top25pct_share": sum(ranked[:top_n]) / total if total else None,
                "entropy": norm,
            }
        )
    reused = sum(hist.values())
    accesses = reused + compulsory
    reuse: dict[str, Any] = {"accesses": accesses, "compulsory": compulsory, "reused": reused}
    for q in QUANTILES:
        reuse[f"p{q}"] = _quantile(hist, reused, q / 100)
    for k in WITHIN:
        hits = sum(n for d, n in hist.items() if d <= k)
        reuse[f"within_{k}"] = hits / accesses if accesses else None
    return {
        "trace": str(path),
        "truncated": reader.truncated,
        "model": {
            "name": spec.name,
            "dtype": spec.dtype,
            "moe_layers": n_layers,
            "num_experts": n_experts,
            "top_k": spec.top_k,
        },
        "steps": {**steps, "total": steps["prefill"] + steps["decode"]},
        "tokens": {**tokens, "total": tokens["prefill"] + tokens["decode"]},
        "layer_records": records,
        "top25pct_experts": top_n,
        "layers": layers,
        "reuse": reuse,
    }


def _fmt(x: float | int | None, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


def render(s: dict[str, Any]) -> str:
    """The human-readable report: a few summary lines and a per-layer table."""
    m, st, tk, ru = s["model"], s["steps"], s["tokens"], s["reuse"]
    lines = [
        f"trace          {s['trace']}{' (truncated)' if s['truncated'] else ''}",
        f"model          {m['name']} ({m['dtype']}): {m['moe_layers']} MoE layers, {m['num_experts']} experts, top-{m['top_k']}",
        f"steps          {st['total']} (prefill {st['prefill']}, decode {st['decode']})",
        f"tokens         {tk['total']} (prefill {tk['prefill']}, decode {tk['decode']})",
        f"layer records  {s['layer_records']}",
        f"accesses       {ru['accesses']} (compulsory {ru['compulsory']}, reused {ru['reused']})",
        "reuse distance "
        + ", ".join(f"p{q} {_fmt(ru[f'p{q}'])}" for q in QUANTILES)
        + "  (calls of the same layer)",
        "reused within  " + ", ".join(f"{k}: {_fmt(ru[f'within_{k}'])}" for k in WITHIN) + "  (share of all accesses)",
        "",
    ]
    head = ["layer", "calls", "experts", "top1", "top25%", "entropy"]
    rows = [
        [str(r["layer"]), str(r["calls"]), str(r["distinct_experts"]), _fmt(r["top1_share"]),
         _fmt(r["top25pct_share"]), _fmt(r["entropy"])]
        for r in s["layers"]
    ]
    lines += _table(head, rows)
    lines.append(
        f"(experts: distinct experts used; top1 / top25%: share of the layer's accesses to its most popular expert / "
        f"its {s['top25pct_experts']} most popular experts; entropy: of the popularity, normalized to 1 = uniform)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m traces.stats", description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, metavar="TRACE")
    parser.add_argument("--json", action="store_true", help="print one JSON object (sorted keys)")
    parser.add_argument("--allow-truncated", action="store_true", help="accept a trace without a footer")
    args = parser.parse_args(argv)
    try:
        s = trace_stats(args.trace, allow_truncated=args.allow_truncated)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.trace}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(s, sort_keys=True) if args.json else render(s))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
