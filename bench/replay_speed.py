"""Throughput of `sim.replay`: layer-steps (trace layer records) per second, in one process.

    python bench/replay_speed.py [--repeats 5]

Each run is the whole `sim.replay.replay()` call: reading and validating the gzip trace, the policy,
the SimPy model and the metrics. Reports the median and the best of the repeats for LRU on the
GSM8K Mixtral trace at several per-layer cache sizes (more misses mean more simulated copies).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.config import CacheConfig  # noqa: E402
from sim.replay import replay  # noqa: E402

TRACE = ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="lru")
    args = ap.parse_args()
    replay(TRACE, args.policy, CacheConfig(per_layer=4))  # warm imports and caches
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, trace {TRACE.name}")
    print("| policy | experts per layer | hit rate | layer-steps | median layer-steps/s | best layer-steps/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in (2, 4, 6):
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = replay(TRACE, args.policy, CacheConfig(per_layer=k)).metrics
            rates.append(m["layer_calls"] / (time.perf_counter() - t0))
        print(
            f"| {args.policy} | {k} | {m['hit_rate']:.3f} | {m['layer_calls']} | {statistics.median(rates):,.0f} | {max(rates):,.0f} |"
        )


if __name__ == "__main__":
    main()
