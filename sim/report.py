"""One self-contained HTML page of plots from a sweep's results.

    python -m sim.report RESULTS/ -o report.html [--timeline-point HASH] [--timeline-steps S]
        [--timeline-from STEP] [--title TEXT]

The page inlines plotly.js once and opens without a network. Its figures:

1. hit rate vs cache size per policy, one panel per trace (hits do not depend on the card, so the
   cards' identical points are drawn once), with Belady's optimum (from the sweep, or replayed here at
   the sweep's sizes when the sweep has no `belady`) and the compulsory-miss bound
   1 - distinct (layer, expert) keys / accesses, which no cache that starts cold can beat;
2. TPOT vs cache size per policy, one panel per trace and card;
3. speedup over `lru` (its TPOT over the policy's, same trace, card and cache request);
4. TPOT against dropped routing mass, the points and their Pareto front (lossy policies trade
   quality for speed; a lossless policy drops nothing);
5. link utilisation (busy fraction of the copy engines) vs cache size;
6. per-layer expert popularity of each trace (share of the layer's accesses per expert);
7. the timeline of one point, replayed again with `sim.replay.replay(..., timeline=...)`: by default
   the `lru` point with the median cache size (of the first trace and card), from the middle step on.

Cache size is on every x axis as expert slots (per-layer sizes times the MoE layers); the hover text
gives the size as the sweep file asked for it and in GiB.
"""

from __future__ import annotations

import argparse
import html
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from sim.sweep import SweepError, read_results
from traces.cli import OneLineParser
from traces.io import TraceError, TraceReader, write_text_atomic
from traces.schema import LayerRecord

PROG = "sim.report"
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#7f7f7f"]
BELADY = "#000000"
PANEL_H = 360
CONFIG = {"displaylogo": False, "responsive": True}


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


def _style(row: dict[str, Any], colour: Any) -> dict[str, Any]:
    """Colour by policy, dash by partition; Belady's optimum black and dashed."""
    glob = row["partition"] == "global"
    if row["policy_name"] == "belady":
        return {"color": BELADY, "dash": "dashdot" if glob else "dash", "width": 2.5}
    return {"color": colour(row["label"]), "dash": "dot" if glob else "solid", "width": 1.8}


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


class Colours:
    def __init__(self, names: Iterable[str]):
        self.map: dict[str, str] = {}
        i = 0
        for n in names:
            if n.startswith("belady"):
                self.map[n] = BELADY
            elif n not in self.map:
                self.map[n] = _PALETTE[i % len(_PALETTE)]
                i += 1

    def __call__(self, name: str) -> str:
        return self.map.get(name, "#333333")


def _policy_order(rows: list[dict[str, Any]], partitions: set[str]) -> list[str]:
    names = list(dict.fromkeys(_curve(r, partitions) for r in rows))
    return sorted(names, key=lambda n: (not n.startswith("lru"), n.startswith("belady"), names.index(n)))


def _grid(n_rows: int, n_cols: int, titles: list[str], **kw: Any) -> go.Figure:
    fig = make_subplots(
        rows=n_rows, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.08 if n_cols > 1 else 0.02,
        vertical_spacing=min(0.12, 0.3 / max(n_rows, 1)) if n_rows > 1 else 0.1, **kw,
    )
    fig.update_layout(
        height=PANEL_H * n_rows + 100, template="plotly_white", margin={"l": 70, "r": 30, "t": 50, "b": 60},
        legend={"groupclick": "togglegroup"},
        hoverlabel={"align": "left"},
    )
    return fig


class Report:
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
        self.colour = Colours(dict.fromkeys(r["label"] for r in self.rows))
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

    # -- figures ------------------------------------------------------------------------------------
    def _lines(
        self, fig: go.Figure, rows: list[dict[str, Any]], y: str, rc: tuple[int, int], shown: set[str],
        scale: float = 1.0, extra: Any = None,
    ) -> None:
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r.get(y) is not None:
                by[_curve(r, self.partitions)].append(r)
        for name in self.curves:
            pts = sorted(by.get(name, []), key=lambda r: r["cache_slots"])
            if not pts:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r["cache_slots"] for r in pts], y=[r[y] * scale for r in pts], name=name, legendgroup=name,
                    showlegend=name not in shown, mode="lines+markers", line=_style(pts[0], self.colour),
                    marker={"size": 6, "symbol": ["circle" if r.get("cache_fits", True) else "circle-open" for r in pts]},
                    hovertext=[_hover(r, extra(r) if extra else "") for r in pts], hoverinfo="text",
                ),
                row=rc[0], col=rc[1],
            )
            shown.add(name)

    @staticmethod
    def _fit_legend(fig: go.Figure) -> None:
        entries = sum(1 for t in fig.data if t.showlegend is not False)
        fig.update_layout(height=max(fig.layout.height or 0, 30 * entries + 150))

    def _panels(self) -> tuple[list[tuple[str, str]], int, int]:
        """(trace, card) panels: a row per trace, a column per card."""
        cells = [(sha, hw) for sha in self.traces for hw in self.hardware]
        return cells, len(self.traces), len(self.hardware)

    def _titles(self, cells: list[tuple[str, str]]) -> list[str]:
        return [f"{self.trace_name[sha]} · {hw}" for sha, hw in cells]

    def fig_hit_rate(self) -> go.Figure:
        n = len(self.traces)
        cols = min(n, 2)
        fig = _grid(math.ceil(n / cols), cols, [self.trace_name[s] for s in self.traces])
        shown: set[str] = set()
        has_belady = any(r["policy_name"] == "belady" for r in self.rows)
        for i, sha in enumerate(self.traces):
            rc = (i // cols + 1, i % cols + 1)
            # hits do not depend on the card, nor does the fit on a card mean anything here: filled markers
            rows = [{**r, "cache_fits": True} for r in self._dedupe_hardware(self.rows_of(sha))]
            if not has_belady:
                rows = rows + self._belady(sha, rows)
            self._lines(fig, rows, "hit_rate", rc, shown)
            facts = self.facts.get(sha)
            if facts is not None:
                xs = sorted({r["cache_slots"] for r in rows})
                name = "compulsory-miss bound"
                fig.add_trace(
                    go.Scatter(
                        x=[min(xs), max(xs)], y=[facts.compulsory_bound] * 2, mode="lines", name=name, legendgroup=name,
                        showlegend=name not in shown, line={"color": "#888888", "dash": "dot", "width": 2},
                        hovertext=f"compulsory-miss bound {facts.compulsory_bound:.4f}: {facts.distinct} distinct "
                                  f"(layer, expert) keys in {facts.accesses} accesses", hoverinfo="text",
                    ),
                    row=rc[0], col=rc[1],
                )
                shown.add(name)
        fig.update_xaxes(title_text="cache size (expert slots)")
        fig.update_yaxes(title_text="hit rate", rangemode="tozero")
        self._fit_legend(fig)
        return fig

    def _dedupe_hardware(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per (policy, cache request): hits do not depend on the card."""
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        for r in rows:
            key = (r["policy"], *_request(r))
            prev = out.get(key)
            if prev is None:
                out[key] = r
            elif prev["hits"] != r["hits"] and "hit rates differ between cards" not in " ".join(self.notes):
                self.notes.append("hit rates differ between cards for the same point (a timing-dependent policy?): "
                                  "the hit-rate panels show the first card's")
        return list(out.values())

    def _belady(self, sha: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Belady's hit rates at the sweep's sizes, replayed here (the sweep did not include it)."""
        from lab.cache import CacheConfig
        from sim.replay import replay

        facts = self.facts.get(sha)
        if facts is None:
            return []
        out = []
        for req in sorted({_request(r) for r in rows}):
            base = next(r for r in rows if _request(r) == req)
            kind, size, part = req
            cfg = CacheConfig(**({"per_layer": size} if kind == "per_layer" else {kind: size, "partition": part}))
            res = replay(facts.path, "belady", cfg, base["hardware_ref"])
            out.append({**base, **res.metrics, "policy": "belady", "policy_name": "belady", "label": "belady"})
        self.curves = list(dict.fromkeys([*self.curves, *(_curve(r, self.partitions) for r in out)]))
        return out

    def fig_metric(self, y: str, ytitle: str, scale: float = 1.0, log: bool = False) -> go.Figure:
        cells, nr, nc = self._panels()
        fig = _grid(nr, nc, self._titles(cells))
        shown: set[str] = set()
        for i, (sha, hw) in enumerate(cells):
            self._lines(fig, self.rows_of(sha, hw), y, (i // nc + 1, i % nc + 1), shown, scale)
        fig.update_xaxes(title_text="cache size (expert slots)")
        fig.update_yaxes(title_text=ytitle, type="log" if log else "linear")
        self._fit_legend(fig)
        return fig

    def fig_speedup(self) -> go.Figure | None:
        cells, nr, nc = self._panels()
        base = {
            (r["trace_sha256"], r["hardware"], *_request(r)): r["tpot_s"]
            for r in self.rows if r["policy"] == "lru" and r.get("tpot_s")
        }
        if not base:
            return None
        fig = _grid(nr, nc, self._titles(cells))
        shown: set[str] = set()
        for i, (sha, hw) in enumerate(cells):
            rows = []
            for r in self.rows_of(sha, hw):
                b = base.get((sha, hw, *_request(r)))
                if b and r.get("tpot_s"):
                    rows.append({**r, "speedup": b / r["tpot_s"]})
            rc = (i // nc + 1, i % nc + 1)
            self._lines(fig, rows, "speedup", rc, shown, extra=lambda r: f"speedup over lru ×{r['speedup']:.3f}")
            fig.add_hline(y=1.0, line_dash="dot", line_color="#888", row=rc[0], col=rc[1])
        fig.update_xaxes(title_text="cache size (expert slots)")
        fig.update_yaxes(title_text="speedup over lru (×)")
        self._fit_legend(fig)
        return fig

    def fig_pareto(self) -> tuple[go.Figure, bool]:
        cells, nr, nc = self._panels()
        fig = _grid(nr, nc, self._titles(cells))
        shown: set[str] = set()
        all_zero = all(not r.get("dropped_mass") for r in self.rows)
        for i, (sha, hw) in enumerate(cells):
            rc = (i // nc + 1, i % nc + 1)
            rows = [r for r in self.rows_of(sha, hw) if r.get("tpot_s") is not None]
            by: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                by[_curve(r, self.partitions)].append(r)
            for name in self.curves:
                pts = by.get(name)
                if not pts:
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=[r["tpot_s"] * 1e3 for r in pts], y=[r["dropped_mass"] for r in pts], mode="markers", name=name,
                        legendgroup=name, showlegend=name not in shown,
                        marker={"color": _style(pts[0], self.colour)["color"], "size": 8, "opacity": 0.8,
                                "symbol": "square" if pts[0]["partition"] == "global" else "circle"},
                        hovertext=[_hover(r, f"dropped mass {r['dropped_mass']:.4f}") for r in pts], hoverinfo="text",
                    ),
                    row=rc[0], col=rc[1],
                )
                shown.add(name)
            front = pareto_front([(r["tpot_s"], r["dropped_mass"], r) for r in rows])
            if front:
                name = "Pareto front"
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] * 1e3 for p in front], y=[p[1] for p in front], mode="lines+markers", name=name,
                        legendgroup=name, showlegend=name not in shown, line={"color": "#000", "shape": "hv", "width": 2},
                        marker={"symbol": "star", "size": 13, "color": "#000"},
                        hovertext=[_hover(p[2], "on the Pareto front") for p in front], hoverinfo="text",
                    ),
                    row=rc[0], col=rc[1],
                )
                shown.add(name)
        fig.update_xaxes(title_text="TPOT (ms, log)", type="log")
        fig.update_yaxes(title_text="dropped routing mass", rangemode="tozero")
        self._fit_legend(fig)
        if all_zero:
            fig.update_yaxes(range=[-0.05, 1.0])
        return fig, all_zero

    def fig_popularity(self) -> go.Figure | None:
        shas = [s for s in self.traces if s in self.facts]
        if not shas:
            return None
        cols = min(len(shas), 2)
        nr = math.ceil(len(shas) / cols)
        fig = _grid(nr, cols, [self.trace_name[s] for s in shas])
        for i, sha in enumerate(shas):
            f = self.facts[sha]
            z = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in f.counts]
            fig.add_trace(
                go.Heatmap(
                    z=z, x=list(range(len(z[0]))), y=list(range(len(z))), coloraxis="coloraxis",
                    customdata=f.counts, hovertemplate="layer %{y}, expert %{x}<br>share %{z:.3f} (%{customdata} accesses)<extra></extra>",
                ),
                row=i // cols + 1, col=i % cols + 1,
            )
        n_layers = max(len(self.facts[s].counts) for s in shas)
        fig.update_layout(
            coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "share"}}},
            height=max(PANEL_H, 14 * n_layers + 120) * nr + 140,
        )
        fig.update_xaxes(title_text="expert", dtick=1 if len(self.facts[shas[0]].counts[0]) <= 16 else None)
        fig.update_yaxes(title_text="MoE layer", autorange="reversed")
        return fig

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

    def fig_timeline(self, row: dict[str, Any], steps: int, first: int | None) -> tuple[go.Figure, str]:
        from lab.cache import CacheConfig
        from sim.engine import Timeline
        from sim.replay import replay
        from sim.timeline import figure

        n_steps = row.get("steps") or 1
        first = n_steps // 2 if first is None else first
        kind, size, part = _request(row)
        cfg = CacheConfig(**({"per_layer": size} if kind == "per_layer" else {kind: size, "partition": part}))
        tl = Timeline(steps, first)
        res = replay(row["trace_path"], row["policy"], cfg, row["hardware_ref"], timeline=tl)
        if res.config["trace"]["sha256"] != row["trace_sha256"] or res.metrics["hits"] != row["hits"]:
            self.notes.append("the timeline's replay does not reproduce the sweep's row (trace or code changed since)")
        title = (f"{row['policy']} · {row['trace']} · {row['hardware']} · {kind.replace('_', '-')} {size:g} "
                 f"({row['cache_slots']} slots) · steps {first}-{first + steps - 1}")
        fig = figure(tl, title)
        fig.update_layout(template="plotly_white", height=max(fig.layout.height or 0, 330))
        caption = (f"point {row['config_hash'][:12]}: TPOT {_ms(row['tpot_s'])}, hit rate {row['hit_rate']:.3f}, "
                   f"link busy {row['link_busy_frac']:.2f}")
        return fig, caption


def pareto_front(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The points no other point beats in both coordinates (lower is better in both), by x."""
    front: list[tuple[float, float, Any]] = []
    best_y = math.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best_y:
            front.append(p)
            best_y = p[1]
    return front


# -- the page ---------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1500px; padding: 0 24px 60px;
       color: #222; }
h1 { margin: 28px 0 6px; } h2 { margin: 40px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.note { color: #555; max-width: 1100px; margin: 4px 0 10px; } p.warn { color: #a04000; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
td, th { border: 1px solid #ddd; padding: 3px 9px; text-align: left; } th { background: #f4f4f4; }
nav a { margin-right: 14px; } code { background: #f4f4f4; padding: 0 3px; }
.figure { margin: 6px 0 18px; }
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(
    results: str | Path, *, timeline_point: str | None = None, timeline_steps: int = 4, timeline_from: int | None = None,
    title: str | None = None,
) -> tuple[str, int]:
    """The page, and the number of figures on it."""
    results = Path(results)
    try:
        rows = read_results(results)
    except SweepError as exc:
        raise ReportError(str(exc)) from None
    rep = Report(rows, results)
    tl_row = rep.pick_timeline_point(timeline_point)
    sections: list[tuple[str, str, str, go.Figure | None]] = []  # (id, heading, note html, figure)

    fig = rep.fig_hit_rate()
    belady_note = ("Belady's optimum is the sweep's <code>belady</code> policy"
                   if any(r["policy_name"] == "belady" for r in rep.rows)
                   else "Belady's optimum was replayed for this page at the sweep's sizes (the sweep has no <code>belady</code>)")
    sections.append(("hit-rate", "Hit rate vs cache size",
                     f"One panel per trace: hits do not depend on the card. {belady_note} (dashed, black); the dotted grey "
                     "line is the compulsory-miss bound 1 − distinct (layer, expert) keys / accesses, which no cache that "
                     "starts cold can exceed.", fig))
    sections.append(("tpot", "TPOT vs cache size",
                     "Mean decode-step latency (time per output token), log scale; a row per trace, a column per card. "
                     "Open markers: the cache does not fit in what the card has left beside the dense weights "
                     "(the simulator times it as if it did).",
                     rep.fig_metric("tpot_s", "TPOT (ms, log)", scale=1e3, log=True)))
    sp = rep.fig_speedup()
    sections.append(("speedup", "Speedup over LRU",
                     "LRU's TPOT divided by the policy's at the same trace, card and cache size (above 1: faster than LRU)."
                     if sp is not None else "<span class='warn'>The sweep has no <code>lru</code> points: no speedup to draw.</span>",
                     sp))
    pf, all_zero = rep.fig_pareto()
    pnote = "Every point of the sweep against the fastest trade-off of latency and routing mass dropped (stars, black)."
    if all_zero:
        pnote += (" <b>Every point has zero dropped mass</b>: all policies in this sweep are lossless, so the front is "
                  "just the fastest point of each panel.")
    sections.append(("pareto", "Pareto front: TPOT vs dropped mass", pnote, pf))
    sections.append(("link", "Link utilisation vs cache size",
                     "Busy fraction of the host-to-device copy engines over the run.",
                     rep.fig_metric("link_busy_frac", "link busy fraction")))
    pop = rep.fig_popularity()
    sections.append(("popularity", "Expert popularity per layer",
                     "Share of each MoE layer's accesses (distinct experts per layer call) that goes to each expert."
                     if pop is not None else "<span class='warn'>No trace is readable here.</span>", pop))
    try:
        tfig, caption = rep.fig_timeline(tl_row, timeline_steps, timeline_from)
    except (TraceError, OSError, ValueError) as exc:
        tfig, caption = None, f"<span class='warn'>cannot replay the point for its timeline: {html.escape(str(exc))}</span>"
    sections.append(("timeline", "Timeline of one point",
                     f"{html.escape(caption)}. The GPU compute stream and each copy engine, replayed again with the "
                     "timeline recorded; choose another point with <code>--timeline-point HASH</code>." if tfig is not None
                     else caption, tfig))

    # summary
    ok = rep.rows
    summary_rows = []
    for sha in rep.traces:
        f = rep.facts.get(sha)
        rs = rep.rows_of(sha)
        summary_rows.append([
            html.escape(rep.trace_name[sha]), html.escape(rs[0]["model"]),
            str(rs[0]["steps"]), str(f.accesses if f else rs[0]["accesses"]),
            f"{f.compulsory_bound:.4f}" if f else "n/a", str(len(rs)),
        ])
    best = []
    for sha in rep.traces:
        for hw in rep.hardware:
            rs = [r for r in rep.rows_of(sha, hw) if r.get("tpot_s")]
            if not rs:
                continue
            med = statistics.median(sorted({r["cache_slots"] for r in rs}))
            at = [r for r in rs if r["cache_slots"] == min({r["cache_slots"] for r in rs}, key=lambda s: abs(s - med))]
            real = [r for r in at if not r.get("oracle")]
            oracle = [r for r in at if r.get("oracle")]
            win = min(real or at, key=lambda r: r["tpot_s"])
            orc = min(oracle, key=lambda r: r["tpot_s"]) if oracle else None
            best.append([html.escape(rep.trace_name[sha]), html.escape(hw), f"{win['cache_slots']}",
                         html.escape(win["label"]), _ms(win["tpot_s"]), f"{win['hit_rate']:.3f}",
                         f"{html.escape(orc['label'])}: {_ms(orc['tpot_s'])}" if orc else "–"])
    page_title = title or f"Sweep report: {results}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(page_title)}</title>", f"<style>{_CSS}</style>",
        f"<script>{_plotlyjs()}</script>", "</head>", "<body>",
        f"<h1>{html.escape(page_title)}</h1>",
        f"<p class='note'>{len(ok)} points ({len(rep.errors)} failed) over {len(rep.traces)} trace(s), "
        f"{len({r['policy'] for r in ok})} policies, {len(rep.hardware)} card(s) "
        f"({html.escape(', '.join(rep.hardware))}) and {len({_request(r) for r in ok})} cache sizes; "
        f"from <code>{html.escape(str(results))}</code>.</p>",
        "<nav>" + "".join(f"<a href='#{sid}'>{html.escape(h)}</a>" for sid, h, _, _ in sections) + "</nav>",
        _table(["trace", "model", "steps", "accesses", "compulsory-miss bound", "points"], summary_rows),
        "<p class='note'>Fastest policy that needs no future knowledge, at the median cache size of each trace "
        "and card, beside the fastest oracle:</p>",
        _table(["trace", "card", "slots", "policy", "TPOT", "hit rate", "fastest oracle"], best),
    ]
    for n in rep.notes:
        parts.append(f"<p class='note warn'>note: {html.escape(n)}</p>")
    n_figs = 0
    for sid, heading, note, f in sections:
        parts += [f"<section id='{sid}'>", f"<h2>{html.escape(heading)}</h2>", f"<p class='note'>{note}</p>"]
        if f is not None:
            parts.append("<div class='figure'>" + pio.to_html(
                f, full_html=False, include_plotlyjs=False, config=CONFIG, div_id=f"fig-{sid}", default_height=f"{f.layout.height}px",
            ) + "</div>")
            n_figs += 1
        parts.append("</section>")
    if rep.errors:
        parts.append("<section id='failed'><h2>Failed points</h2>")
        parts.append(_table(["hash", "point", "error"], [
            [r["config_hash"][:12], html.escape(f"{r.get('policy')} / {r.get('trace')} / {r.get('hardware')} / "
                                                f"{r.get('cache_kind')}={r.get('cache_size')}"), html.escape(str(r.get("error")))]
            for r in rep.errors
        ]))
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts), n_figs


def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


# -- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.report", description="Draw a sweep's results as one self-contained HTML page.")
    p.add_argument("results", type=Path, help="results folder of python -m sim.sweep (or its results.jsonl)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--timeline-point", metavar="HASH", help="config hash (or a unique prefix) of the point whose timeline to draw")
    p.add_argument("--timeline-steps", type=int, default=4, metavar="S", help="steps in the timeline (default 4)")
    p.add_argument("--timeline-from", type=int, metavar="STEP", help="first step of the timeline (default: the middle step)")
    p.add_argument("--title", help="page title")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeline_steps < 1 or (args.timeline_from is not None and args.timeline_from < 0):
        print(f"{PROG}: error: --timeline-steps must be at least 1 and --timeline-from at least 0", file=sys.stderr)
        return 2
    try:
        page, n = render(
            args.results, timeline_point=args.timeline_point, timeline_steps=args.timeline_steps,
            timeline_from=args.timeline_from, title=args.title,
        )
        write_text_atomic(args.out, page)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n} figures, {len(page) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
