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

The package, by seam: `data` (rows, trace facts, Pareto front), `figures` (one method per figure),
`page` (the HTML) and `cli` (`python -m sim.report`).
"""

from sim.report.cli import build_parser, main
from sim.report.data import PROG, ReportData, ReportError, TraceFacts, pareto_front, short_spec, trace_facts
from sim.report.figures import Report
from sim.report.page import render

__all__ = [
    "PROG", "Report", "ReportData", "ReportError", "TraceFacts", "build_parser", "main", "pareto_front", "render",
    "short_spec", "trace_facts",
]
