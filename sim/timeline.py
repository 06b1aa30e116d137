"""The timeline of a replay as a plotly Gantt chart: one row per stream (the host, when the profile has
host costs; GPU compute; each copy engine);
and the same intervals as Chrome/Perfetto trace events (chrome://tracing, ui.perfetto.dev)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from sim.engine import Timeline
from traces.io import write_text_atomic

_COLOURS = {"dense": "#8c8c8c", "expert": "#1f77b4", "stall": "#f7b6b6", "load": "#d62728", "prefetch": "#2ca02c",
            # the host lane (a profile with host costs): its own work
            "step": "#bcbd22", "launch": "#c5b0d5", "plan": "#9467bd", "submit": "#ff9896", "cpu": "#ff7f0e"}


def figure(tl: Timeline, title: str = "timeline") -> go.Figure:
    fig = go.Figure()
    for kind, colour in _COLOURS.items():
        ivs = [iv for iv in tl.intervals if iv.label.split(" ")[0] == kind]
        if not ivs:
            continue
        fig.add_trace(
            go.Bar(
                name=kind,
                orientation="h",
                y=[iv.lane for iv in ivs],
                base=[iv.start * 1e3 for iv in ivs],
                x=[(iv.end - iv.start) * 1e3 for iv in ivs],
                marker_color=colour,
                text=[iv.label for iv in ivs],
                customdata=[[iv.step, iv.start * 1e3, iv.end * 1e3] for iv in ivs],
                hovertemplate="%{text}<br>step %{customdata[0]}<br>%{customdata[1]:.3f}-%{customdata[2]:.3f} ms<extra></extra>",
                textposition="none",
                marker_line_width=0,
            )
        )
    for step, start, end in tl.steps:  # step boundaries, labelled
        fig.add_vrect(
            x0=start * 1e3, x1=end * 1e3, line_width=1, line_dash="dot", line_color="#555", fillcolor="rgba(0,0,0,0)",
            annotation_text=f"step {step}", annotation_position="top left", annotation_font_size=10,
        )
    lanes = _lanes(tl)
    fig.update_layout(
        title=title,
        barmode="overlay",
        xaxis_title="time (ms)",
        yaxis={"categoryorder": "array", "categoryarray": list(reversed(lanes))},
        height=200 + 60 * len(lanes),
        legend_title_text="work",
    )
    return fig


def write_timeline(tl: Timeline, path: Path, title: str = "timeline") -> None:
    """A self-contained HTML file (plotly.js inlined: opens without a network)."""
    write_text_atomic(path, figure(tl, title).to_html(include_plotlyjs=True, full_html=True))


def _lanes(tl: Timeline) -> list[str]:
    return sorted({iv.lane for iv in tl.intervals}, key=lambda s: (s != "host", s != "gpu", s))


def chrome_trace(tl: Timeline, title: str = "timeline") -> dict[str, Any]:
    """The timeline in the Trace Event Format: one complete event (`ph: "X"`, `ts`/`dur` in
    microseconds of simulated time) per interval, one thread per stream (`gpu`, `h2d0`, ...), and per
    step a span on a `steps` thread plus a global instant marker at its start."""
    pid = 1
    tids = {"steps": 1}
    for lane in _lanes(tl):
        tids[lane] = len(tids) + 1
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": title}},
    ]
    for lane, tid in tids.items():
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})

    def us(t: float) -> float:
        return round(t * 1e6, 3)  # nanosecond resolution: enough, and the same bytes for the same run

    for step, start, end in tl.steps:
        events.append({"name": f"step {step}", "cat": "step", "ph": "X", "ts": us(start), "dur": us(end - start),
                       "pid": pid, "tid": tids["steps"], "args": {"step": step}})
        events.append({"name": f"step {step}", "cat": "step", "ph": "i", "s": "g", "ts": us(start), "pid": pid,
                       "tid": tids["steps"], "args": {"step": step}})
    for iv in tl.intervals:
        events.append({"name": iv.label, "cat": iv.label.split(" ")[0], "ph": "X", "ts": us(iv.start),
                       "dur": us(iv.end - iv.start), "pid": pid, "tid": tids[iv.lane], "args": {"step": iv.step}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"title": title, "clock": "simulated"}}


def write_chrome_trace(tl: Timeline, path: Path, title: str = "timeline") -> None:
    """A JSON file for chrome://tracing or ui.perfetto.dev."""
    write_text_atomic(path, json.dumps(chrome_trace(tl, title), separators=(",", ":")) + "\n")
