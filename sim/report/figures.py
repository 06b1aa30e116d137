"""The figures of a sweep report (plotly), one method each, drawn from `ReportData`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sim.report.data import ReportData, _curve, _hover, _ms, _request, pareto_front

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#7f7f7f"]
BELADY = "#000000"
PANEL_H = 360
CONFIG = {"displaylogo": False, "responsive": True}


def _style(row: dict[str, Any], colour: Any) -> dict[str, Any]:
    """Colour by policy, dash by partition; Belady's optimum black and dashed."""
    glob = row["partition"] == "global"
    if row["policy_name"] == "belady":
        return {"color": BELADY, "dash": "dashdot" if glob else "dash", "width": 2.5}
    return {"color": colour(row["label"]), "dash": "dot" if glob else "solid", "width": 1.8}


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


class Report(ReportData):
    """The data and its figures."""

    def __init__(self, rows: list[dict[str, Any]], results: Path):
        super().__init__(rows, results)
        self.colour = Colours(dict.fromkeys(r["label"] for r in self.rows))

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

