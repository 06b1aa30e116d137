"""Wall time of `python -m sim.sweep` on the example Mixtral grids, end to end, from an empty results
folder.

    python bench/sweep_speed.py [--jobs 2] [--sweeps sweeps/mixtral.toml sweeps/mixtral-large.toml]
        [--no-compare]

For each sweep file: the whole CLI command timed as a subprocess (start-up, validation with every
trace read in full, the process pool, every row appended and fsynced), then a rerun on the finished
results (validation and skipping only). `--no-compare` leaves out the second measurement on the first
sweep: the same run through the plain `sim.replay.replay()` path, which parses the trace again for
every point, against the default that parses each trace once per worker process.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.sweep import load_sweep, run_sweep  # noqa: E402


def cli(sweep: Path, out: Path, jobs: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "sim.sweep", str(sweep), "-o", str(out), "--jobs", str(jobs), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"sweep failed ({r.returncode}): {r.stderr}")
    return wall, r.stderr.strip().splitlines()[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--sweeps", nargs="+", type=Path, default=[ROOT / "sweeps/mixtral.toml", ROOT / "sweeps/mixtral-large.toml"])
    p.add_argument("--no-compare", action="store_true")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; --jobs {args.jobs}")
    print()
    print("| sweep | points | end-to-end wall (s) | points/s | trace parses | rerun, all done (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for sweep in args.sweeps:
        n = len(load_sweep(sweep).points)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results"
            wall, line = cli(sweep, out, args.jobs)
            parses = re.search(r"trace parses: (\d+)", line)
            rerun, line2 = cli(sweep, out, args.jobs)
            assert f"0 run, {n} already done" in line2, line2
        print(f"| {sweep.relative_to(ROOT) if sweep.is_relative_to(ROOT) else sweep} | {n} | {wall:.1f} | {n / wall:.1f} | "
              f"{parses.group(1) if parses else '?'} | {rerun:.1f} |")
    if not args.no_compare:
        sweep = args.sweeps[0]
        sw = load_sweep(sweep)
        print()
        print(f"trace parsing, {sweep.name}, run_sweep() in-process (validation excluded), --jobs {args.jobs}:")
        print()
        print("| traces parsed | wall (s) | points/s | trace parses |")
        print("| --- | ---: | ---: | ---: |")
        for reuse, label in ((False, "for every point (plain replay())"), (True, "once per worker process (default)")):
            with tempfile.TemporaryDirectory() as tmp:
                s = run_sweep(sw, Path(tmp) / "r", jobs=args.jobs, reuse_traces=reuse)
            assert s.ran == len(sw.points) and not s.errors
            print(f"| {label} | {s.wall_s:.1f} | {s.ran / s.wall_s:.1f} | {s.parses} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
