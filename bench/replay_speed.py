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

from lab.cache import CacheConfig  # noqa: E402
from lab.hardware import load_profile  # noqa: E402
from policies import Counters, apply_plan, make_policy  # noqa: E402
from sim.engine import Simulation, request_from_record  # noqa: E402
from sim.replay import replay  # noqa: E402
from traces.io import TraceReader  # noqa: E402
from traces.schema import LayerRecord  # noqa: E402

TRACE = ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz"


def stages(per_layer: int = 4, repeats: int = 5) -> None:
    """Where the time goes: each stage timed on its own (best of `repeats`), per layer-step."""

    def best(fn) -> float:  # type: ignore[no-untyped-def]
        return min(fn() for _ in range(repeats))

    def read() -> float:
        t0 = time.perf_counter()
        for _ in TraceReader(TRACE):
            pass
        return time.perf_counter() - t0

    records = list(TraceReader(TRACE))
    layer_records = [r for r in records if isinstance(r, LayerRecord)]
    model = TraceReader(TRACE).header.model
    n = len(layer_records)

    def policy_and_apply() -> float:
        reqs = [request_from_record(r) for r in layer_records]
        pol, cache = make_policy("lru"), CacheConfig(per_layer=per_layer).build(model)
        pol.reset(model, cache, None)
        counters = Counters()
        t0 = time.perf_counter()
        for req in reqs:
            apply_plan(cache, req, pol.plan(req, cache), counters, {"full": model.expert_bytes})
            cache.inflight.clear()  # no engine here: every copy lands at once
        return time.perf_counter() - t0

    def simulate() -> float:
        pol, cache = make_policy("lru"), CacheConfig(per_layer=per_layer).build(model)
        costs = load_profile("rtx4090").cost_model(model)
        pol.reset(model, cache, costs)
        t0 = time.perf_counter()
        Simulation(model, pol, cache, costs).run(records)
        return time.perf_counter() - t0

    r, p, s = best(read), best(policy_and_apply), best(simulate)
    us = 1e6 / n
    print(f"\nstages, lru, {per_layer} experts per layer, best of {repeats}, microseconds per layer-step:")
    print(f"read + validate {r * us:.2f} | policy + apply {p * us:.2f} | requests, compute stream, copy engine "
          f"{(s - p) * us:.2f} | simulation without reading {s * us:.2f} | sum {(r + s) * us:.2f}")


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
    stages(repeats=args.repeats)


if __name__ == "__main__":
    main()
