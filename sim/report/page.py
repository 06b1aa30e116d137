"""The report page: every figure with its note, the summary tables and the failed points, in one
self-contained HTML file (plotly.js inlined once)."""

from __future__ import annotations

import html
import statistics
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from sim.report.data import ReportError, _ms, _request
from sim.report.figures import CONFIG, Report
from sim.sweep import SweepError, read_results
from traces.io import TraceError

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

