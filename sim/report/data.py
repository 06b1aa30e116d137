"""The data of a sweep report: the successful and failed rows, the traces' facts (accesses, distinct
keys, popularity), names for the curves, and the Pareto front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.io import TraceError, TraceReader
from traces.schema import LayerRecord

PROG = "sim.report"


class ReportError(ValueError):
    pass


# -- data -------------------------------------------------------------------------------------------
@dataclass
class TraceFacts:
    name: str
    path: str
    sha256: str
    model: str
    accesses: int
    distinct: int
    counts: list[list[int]]  # [layer][expert] accesses
    calls: int

    @property
    def compulsory_bound(self) -> float:
        return 1.0 - self.distinct / self.accesses if self.accesses else 0.0


def trace_facts(path: str, name: str, sha256: str) -> TraceFacts:
    """One pass: accesses (distinct experts per layer call, as the simulator counts them), distinct
    (layer, expert) keys, and the per-layer popularity counts."""
    reader = TraceReader(path)
    m = reader.header.model
    counts = [[0] * m.num_experts for _ in range(m.num_moe_layers)]
    accesses = calls = 0
    for rec in reader:
        if not isinstance(rec, LayerRecord):
            continue
        calls += 1
        row = counts[rec.layer]
        for e in {e for r in rec.topk for e in r}:
            row[e] += 1
            accesses += 1
    distinct = sum(1 for row in counts for c in row if c)
    return TraceFacts(name, path, sha256, m.name, accesses, distinct, counts, calls)


def short_spec(spec: str) -> str:
    """A canonical spec without the parameters left at their defaults: `lfu(decay=1.0)` -> `lfu`."""
    from policies import REGISTRY, parse_spec

    out = []
    for name, params in parse_spec(spec):
        cls = REGISTRY.get(name)
        fields = cls.Params.model_fields if cls is not None else {}
        keep = {k: v for k, v in params.items() if k not in fields or fields[k].default != v}
        args = ", ".join(f"{k}={v if isinstance(v, (int, float)) else repr(v)}" for k, v in keep.items())
        out.append(f"{name}({args})" if args else name)
    return "+".join(out)


def _oracle(row: dict[str, Any]) -> bool:
    """Whether the point's policy needs the future (rows of older sweeps lack the column)."""
    if "oracle" in row:
        return bool(row["oracle"])
    from policies import PolicySpecError, make_policy

    try:
        return make_policy(row["policy"]).wants_future()
    except PolicySpecError:
        return False


def _curve(row: dict[str, Any], partitions: set[str]) -> str:
    """A curve's name: the policy, with the partition when the sweep has both."""
    if len(partitions) > 1:
        return f"{row['label']} ({row['partition'].replace('_', '-')})"
    return row["label"]


def _request(row: dict[str, Any]) -> tuple[str, float, str]:
    return (row["cache_kind"], row["cache_size"], row["partition"])


def _hover(row: dict[str, Any], extra: str = "") -> str:
    size = f"{row['cache_kind'].replace('_', '-')} {row['cache_size']:g}"
    return (
        f"{row['policy']}<br>{row['trace']} · {row['hardware']}<br>cache {size} = {row['cache_slots']} slots, "
        f"{row['cache_gib']:.1f} GiB ({row['partition'].replace('_', '-')})"
        + ("" if row.get("cache_fits", True) else " — exceeds the card's memory")
        + f"<br>hit rate {row['hit_rate']:.3f} · TPOT {_ms(row['tpot_s'])}" + (f"<br>{extra}" if extra else "")
    )


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f} ms"


def _policy_order(rows: list[dict[str, Any]], partitions: set[str]) -> list[str]:
    names = list(dict.fromkeys(_curve(r, partitions) for r in rows))
    return sorted(names, key=lambda n: (not n.startswith("lru"), n.startswith("belady"), names.index(n)))


class ReportData:
    """A sweep's rows and the facts of its traces, as the figures read them."""

    def __init__(self, rows: list[dict[str, Any]], results: Path):
        self.results = results
        self.all_rows = rows
        self.rows = [{**r, "label": short_spec(r["policy"]), "oracle": _oracle(r)} for r in rows if r.get("status") == "ok"]
        self.errors = [r for r in rows if r.get("status") != "ok"]
        if not self.rows:
            raise ReportError(f"{results}: no successful points to draw ({len(self.errors)} failed)")
        self.partitions = {r["partition"] for r in self.rows}
        self.traces = list(dict.fromkeys(r["trace_sha256"] for r in self.rows))
        names: dict[str, str] = {}
        for sha in self.traces:
            r = next(r for r in self.rows if r["trace_sha256"] == sha)
            name = r["trace"]
            names[sha] = name if name not in names.values() else f"{name} ({sha[:8]})"
        self.trace_name = names
        self.hardware = list(dict.fromkeys(r["hardware"] for r in self.rows))
        self.curves = _policy_order(self.rows, self.partitions)
        self.notes: list[str] = []
        self.facts: dict[str, TraceFacts] = {}
        for sha in self.traces:
            r = next(r for r in self.rows if r["trace_sha256"] == sha)
            try:
                facts = trace_facts(r["trace_path"], names[sha], sha)
            except (TraceError, OSError) as exc:
                self.notes.append(f"trace {names[sha]} is not readable here ({exc}): no bound or popularity for it")
                continue
            from traces.io import file_digest

            if file_digest(Path(r["trace_path"])) != sha:
                self.notes.append(f"trace {r['trace_path']} changed since the sweep ran: no bound or popularity for it")
                continue
            self.facts[sha] = facts

    def rows_of(self, sha: str, hardware: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["trace_sha256"] == sha and (hardware is None or r["hardware"] == hardware)]

    def pick_timeline_point(self, want: str | None) -> dict[str, Any]:
        if want:
            match = [r for r in self.all_rows if r["config_hash"].startswith(want.lower())]
            if not match:
                raise ReportError(f"--timeline-point {want}: no point of {self.results} has that config hash")
            if len(match) > 1:
                raise ReportError(f"--timeline-point {want}: {len(match)} points start with it; give more characters")
            if match[0].get("status") != "ok":
                raise ReportError(f"--timeline-point {want}: that point failed in the sweep ({match[0].get('error')})")
            return match[0]
        sha, hw = self.traces[0], self.hardware[0]
        cands = [r for r in self.rows_of(sha, hw) if r["policy"] == "lru"] or self.rows_of(sha, hw)
        cands.sort(key=lambda r: (r["cache_slots"], r["partition"]))
        return cands[(len(cands) - 1) // 2]


def pareto_front(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The points no other point beats in both coordinates (lower is better in both), by x."""
    front: list[tuple[float, float, Any]] = []
    best_y = math.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best_y:
            front.append(p)
            best_y = p[1]
    return front

