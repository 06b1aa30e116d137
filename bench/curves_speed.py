"""Speed of `sim.curves`: accesses per second of the curve computation, apart from reading the trace.

    python bench/curves_speed.py [--repeats 5] [--traces TRACE ...]

For each trace (default: the two shipped Mixtral traces) and partition, best of the repeats, in one
process:

- read + validate: iterating `TraceReader` (gzip, JSON, pydantic), nothing else;
- calls: the validated records turned into keys in access order (`calls_from_records`);
- LRU: the stack depths of every access (`lru_depths`) and the hits at every size (`hits_below`);
- OPT: the same with the Belady priority stack (`opt_depths`, level by level in numpy);
- OPT walk: the same stack walked call by call in Python (`_opt_depths_walk`, the implementation
  `opt_depths` replaced and is tested against), timed alternately with OPT in the same loop, and the
  ratio of the two (speed-up), which is steadier than either figure on a shared machine;
- curves: `compute_curves`, everything after reading (calls excluded): LRU, OPT, the sizes, the bound.

An access is one distinct expert of one layer call (what `sim.replay` counts as `accesses`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the OPT walk, the reference opt_depths is tested against

import numpy as np  # noqa: E402
from curves_reference import _opt_depths_walk  # noqa: E402

from sim.curves import (  # noqa: E402
    Calls,
    Partition,
    calls_from_records,
    compute_curves,
    hits_below,
    lru_depths,
    opt_depths,
)
from traces.io import TraceReader  # noqa: E402
from traces.schema import LayerRecord  # noqa: E402

TRACES = [ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz", ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz"]


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_pair(fa: Callable[[], object], fb: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best times of two functions run alternately (A, B, A, B, ...): both see the same machine."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def curve(depths: Callable[[Calls, Partition], np.ndarray], calls: Calls, partition: Partition, sizes: list[int]) -> list[int]:
    return hits_below(depths(calls, partition), sizes)


def rate(n: int, t: float) -> str:
    return f"{n / t:,.0f} ({t / n * 1e6:.2f})"


def row(path: Path, repeats: int) -> list[str]:
    model = TraceReader(path).header.model
    records = [rec for rec in TraceReader(path) if isinstance(rec, LayerRecord)]
    t_read = best(lambda: sum(1 for _ in TraceReader(path)), repeats)
    t_calls = best(lambda: calls_from_records(model, records), repeats)
    calls = calls_from_records(model, records)
    n = calls.accesses
    lines = []
    for partition in ("global", "per_layer"):
        sizes = compute_curves(calls, partition).sizes
        t_lru = best(partial(curve, lru_depths, calls, partition, sizes), repeats)
        t_opt, t_walk = best_pair(
            partial(curve, opt_depths, calls, partition, sizes), partial(curve, _opt_depths_walk, calls, partition, sizes), repeats
        )
        t_all = best(partial(compute_curves, calls, partition), repeats)
        lines.append(
            f"| {path.name} | {partition} | {n:,} | {len(sizes)} | {rate(n, t_read)} | {rate(n, t_calls)} | "
            f"{rate(n, t_lru)} | {rate(n, t_opt)} | {rate(n, t_walk)} | {t_walk / t_opt:.2f}x | {rate(n, t_all)} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--traces", nargs="+", type=Path, default=TRACES, metavar="TRACE",
                    help="traces to time (default: the Mixtral GSM8K and HumanEval traces)")
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, best of {args.repeats}; "
          "accesses/s (microseconds per access)")
    print("| trace | partition | accesses | sizes | read + validate | calls | LRU curve | OPT curve | OPT walk | "
          "OPT speed-up | curves (LRU + OPT + bound) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.traces:
        print("\n".join(row(path, args.repeats)))


if __name__ == "__main__":
    main()
