"""`python -m sim.report`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from policies import PolicySpecError, load_plugins
from sim.report.data import PROG, ReportError
from sim.report.page import render
from traces.cli import OneLineParser
from traces.io import write_text_atomic


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.report", description="Draw a sweep's results as one self-contained HTML page.")
    p.add_argument("results", type=Path, help="results folder of python -m sim.sweep (or its results.jsonl)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--timeline-point", metavar="HASH", help="config hash (or a unique prefix) of the point whose timeline to draw")
    p.add_argument("--timeline-steps", type=int, default=4, metavar="S", help="steps in the timeline (default 4)")
    p.add_argument("--timeline-from", type=int, metavar="STEP", help="first step of the timeline (default: the middle step)")
    p.add_argument("--title", help="page title")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (or a .py file) that registers policies first; repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeline_steps < 1 or (args.timeline_from is not None and args.timeline_from < 0):
        print(f"{PROG}: error: --timeline-steps must be at least 1 and --timeline-from at least 0", file=sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        page, n = render(
            args.results, timeline_point=args.timeline_point, timeline_steps=args.timeline_steps,
            timeline_from=args.timeline_from, title=args.title,
        )
        write_text_atomic(args.out, page)
    except (ReportError, PolicySpecError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n} figures, {len(page) / 1e6:.1f} MB)")
    return 0

