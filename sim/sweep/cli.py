"""`python -m sim.sweep`: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from sim.sweep.backends import _ray, run_sweep
from sim.sweep.spec import EXPORT_FORMATS, PROG, RESULTS_FILE, SweepError, load_sweep
from sim.sweep.store import _pyarrow, export
from traces.cli import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.sweep", description="Run a grid of replays in parallel; resumable.")
    p.add_argument("sweep", type=Path, help="sweep file (.toml)")
    p.add_argument("-o", "--out", type=Path, required=True, help="results folder (results.jsonl inside; created)")
    p.add_argument("--jobs", "-j", type=int, help="parallel workers (default: all cores)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="process pool (default) or Ray tasks")
    p.add_argument("--address", help="Ray cluster address (with --backend ray; default: a local Ray)")
    p.add_argument("--export", action="append", choices=EXPORT_FORMATS, default=[], metavar="FORMAT",
                   help="also write results.csv or results.parquet (pyarrow) from all rows; repeatable")
    p.add_argument("--retry-errors", action="store_true", help="rerun points whose earlier run failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (or a .py file) that registers policies, here and in every worker; repeatable")
    return p


def _describe(row: dict[str, Any]) -> str:
    return f"{row['policy']} / {row['trace']} / {row['hardware']} / {row['cache_kind']}={row['cache_size']}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    if args.jobs is not None and args.jobs < 1:
        print(f"{PROG}: error: --jobs must be at least 1", file=err)
        return 2
    if args.address and args.backend != "ray":
        print(f"{PROG}: error: --address needs --backend ray", file=err)
        return 2
    # SIGTERM (a scheduler's stop, `kill`) stops the sweep as Ctrl-C does: the pool is shut down and no
    # worker is left running on
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if "parquet" in args.export:
            _pyarrow()
        if args.backend == "ray":
            _ray()
        sweep = load_sweep(args.sweep, plugins=args.plugin)
        summary = run_sweep(
            sweep, args.out, jobs=args.jobs, backend=args.backend, address=args.address,
            progress=not args.no_progress, retry_errors=args.retry_errors,
        )
    except SweepError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return 2
    results = args.out / RESULTS_FILE
    if summary.dropped_torn:
        print(f"note: dropped a torn last line ({summary.dropped_torn} bytes) of {results} left by an interrupted run", file=err)
    rate = f" ({summary.ran / summary.wall_s:.1f} points/s)" if summary.ran and summary.wall_s else ""
    print(
        f"{PROG}: {summary.points} points"
        + (f" ({sweep.excluded} excluded)" if sweep.excluded else "")
        + f": {summary.ran} run, {summary.skipped} already done, {len(summary.errors)} failed"
        + f" in {summary.wall_s:.1f} s{rate}; trace parses: {summary.parses}; results: {results}",
        file=err,
    )
    for row in summary.errors[:10]:
        print(f"failed: {row['config_hash'][:12]} {_describe(row)}: {row['error']}", file=err)
    if len(summary.errors) > 10:
        print(f"failed: ... and {len(summary.errors) - 10} more (status \"error\" rows in {results})", file=err)
    if summary.interrupted:
        print(f"{PROG}: interrupted: {summary.ran} points saved; rerun the same command to resume", file=err)
        return 130
    try:
        for fmt in args.export:
            print(f"wrote {export(args.out, fmt)}")
    except SweepError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: cannot write the export: {exc}", file=err)
        return 2
    return 1 if summary.errors else 0


