"""Throughput of `sim.replay` against yardsticks measured in the same run.

    python bench/replay_speed.py [--repeats 7] [--trace traces/mixtral-8x7b-humaneval.jsonl.gz]

Each replay is the whole `sim.replay.replay()` call: the columnar trace (from its on-disk cache after
the first read, `traces.trace_cache`), the policy, the SimPy timing model and the metrics. Beside it,
timed alternately in the same loop so that a loaded machine slows both alike:

- **plain-Python LRU**: a per-layer LRU written as a researcher would write it in a notebook, an
  `OrderedDict` per layer over the same calls (each call's experts in access order, prepared before
  timing), with the project's semantics (an expert of the current call is never evicted for another
  of the same call; recency after the call is its access order) so that its hit count equals the
  replay's, which the bench checks;
- **public tools**, where installed (a bench-only virtual environment, never a dependency): a
  fixed-latency replay of the same calls in `libcachesim` (its C LRU, per layer) and `moe-policylang`.

"x LRU" is replay time over LRU time, the median of the per-repeat ratios: the number that means
something on a shared machine, where absolute rates are mostly the machine's load (printed before
and after). Times are this process's CPU seconds by default (`--clock wall` for wall seconds, what a
quiet machine's table should show; there the two agree). Then the stage line: the same replay split into trace load, requests, policy + apply,
and the engine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.cache import CacheConfig  # noqa: E402
from lab.hardware import load_profile  # noqa: E402
from policies import Counters, apply_plan, make_policy  # noqa: E402
from sim import calls as sim_calls  # noqa: E402
from sim.engine import Simulation  # noqa: E402
from sim.replay import replay  # noqa: E402
from traces.columnar import read_columnar  # noqa: E402

TRACE = ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz"
CLOCK = time.process_time  # --clock wall: time.perf_counter


def lru_calls(trace: Path) -> tuple[list[tuple[int, list[int]]], int]:
    """(layer, experts in access order) of every call, and the number of layers."""
    col = read_columnar(trace)
    out = [(r.layer, r.experts_in_access_order()) for r in sim_calls.requests(col)]
    return out, col.header.model.num_moe_layers


def plain_lru(calls: list[tuple[int, list[int]]], n_layers: int, k: int) -> int:
    """Per-layer LRU in plain Python; returns the hits."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n_layers)]
    hits = 0
    for layer, experts in calls:
        c = caches[layer]
        for e in experts:
            if e in c:
                hits += 1
            else:
                if len(c) >= k:
                    for v in c:  # least recent first, never one of this call's experts
                        if v not in experts:
                            break
                    del c[v]
                c[e] = None
        for e in experts:
            c.move_to_end(e)
    return hits


# -- public tools (optional) ------------------------------------------------------------------------
def _libcachesim() -> Any:
    try:
        import libcachesim  # type: ignore[import-not-found]
    except ImportError:
        return None
    return libcachesim


def libcachesim_lru(lcs: Any, calls: list[tuple[int, list[int]]], n_layers: int, k: int) -> int:
    """libCacheSim's C LRU, one cache of k objects per layer, fed request by request from Python
    (its semantics: a miss may evict an expert of the same call, so its hits differ a little)."""
    caches = [lcs.LRU(cache_size=k, hashpower=8) for _ in range(n_layers)]
    hits = 0
    req = lcs.Request()
    for layer, experts in calls:
        c = caches[layer]
        for e in experts:
            req.obj_id = e
            req.obj_size = 1
            if c.get(req):
                hits += 1
    return hits


def _policylang() -> Any:
    try:
        from moe_policylang.benchmark import replay as mpl  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mpl


def policylang_inputs(calls: list[tuple[int, list[int]]], n_layers: int, n_experts: int) -> list[Any]:
    """Per layer, the (calls, experts) score matrix moe-policylang's replay takes: the call's experts
    scored by their rank in the access order (so its top-k are the call's experts)."""
    import numpy as np

    per: list[list[list[int]]] = [[] for _ in range(n_layers)]
    for layer, experts in calls:
        per[layer].append(experts)
    out = []
    for rows in per:
        m = np.zeros((len(rows), n_experts), dtype=np.float32)
        for i, experts in enumerate(rows):
            for r, e in enumerate(experts):
                m[i, e] = 1.0 - r / (len(experts) + 1)
        out.append(m)
    return out


def policylang_lru(mpl: Any, scores: list[Any], top_k: int, k: int) -> int:
    """moe-policylang's offline replay (`benchmark.replay.policy_topk_lru`), layer by layer: a
    fixed-latency hit-rate replay, no timing model."""
    return sum(mpl.policy_topk_lru(s, top_k, k)[0] for s in scores if len(s))


def tools() -> dict[str, Any]:
    found: dict[str, Any] = {}
    lcs = _libcachesim()
    if lcs is not None:
        found["libcachesim"] = lcs
    mpl = _policylang()
    if mpl is not None:
        found["moe-policylang"] = mpl
    return found


# -- the bench --------------------------------------------------------------------------------------
def measure(trace: Path, k: int, repeats: int, calls: list[tuple[int, list[int]]], n_layers: int, found: dict[str, Any]) -> dict[str, Any]:
    cache = CacheConfig(per_layer=k)
    model = read_columnar(trace).header.model
    top_k = model.top_k
    scores = policylang_inputs(calls, n_layers, model.num_experts) if "moe-policylang" in found else []
    rows: dict[str, list[float]] = {"replay": [], "lru": [], **{name: [] for name in found}}
    hits: dict[str, int] = {}
    m: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = CLOCK()
        m = replay(trace, "lru", cache).metrics
        rows["replay"].append(CLOCK() - t0)
        t0 = CLOCK()
        hits["lru"] = plain_lru(calls, n_layers, k)
        rows["lru"].append(CLOCK() - t0)
        if "libcachesim" in found:
            t0 = CLOCK()
            hits["libcachesim"] = libcachesim_lru(found["libcachesim"], calls, n_layers, k)
            rows["libcachesim"].append(CLOCK() - t0)
        if "moe-policylang" in found:
            t0 = CLOCK()
            hits["moe-policylang"] = policylang_lru(found["moe-policylang"], scores, top_k, k)
            rows["moe-policylang"].append(CLOCK() - t0)
    replay_hits = m["hits"] + m["inflight_hits"]
    if hits["lru"] != replay_hits:
        raise SystemExit(f"the plain LRU counts {hits['lru']} hits, the replay {replay_hits}: not the same work")
    n = m["layer_calls"]
    out = {"k": k, "hit_rate": m["hit_rate"], "n": n, "accesses": m["accesses"], "median": n / statistics.median(rows["replay"]),
           "best": n / min(rows["replay"]),
           "x_lru": statistics.median(r / y for r, y in zip(rows["replay"], rows["lru"], strict=True)),
           "lru_rate": n / statistics.median(rows["lru"])}
    for name in found:
        out[f"x_{name}"] = statistics.median(r / y for r, y in zip(rows["replay"], rows[name], strict=True))
        out[f"{name}_hits"] = hits[name]
    return out


def stages(trace: Path, per_layer: int, repeats: int) -> str:
    """Where the time goes, each stage timed on its own (best of `repeats`), per layer-step."""
    col = read_columnar(trace)
    model = col.header.model
    n = col.n

    def best(fn: Any) -> float:
        return min(fn() for _ in range(repeats))

    def load() -> float:
        t0 = CLOCK()
        read_columnar(trace)
        return CLOCK() - t0

    def reqs() -> float:
        t0 = CLOCK()
        for _ in sim_calls.requests(col):
            pass
        return CLOCK() - t0

    def policy_and_apply() -> float:
        rs = list(sim_calls.requests(col))
        pol, cache = make_policy("lru"), CacheConfig(per_layer=per_layer).build(model)
        pol.reset(model, cache, None)
        counters = Counters()
        t0 = CLOCK()
        for req in rs:
            apply_plan(cache, req, pol.plan(req, cache), counters, {"full": model.expert_bytes}, pol)
            cache.inflight.clear()  # no engine here: every copy lands at once
        return CLOCK() - t0

    def simulate() -> float:
        rs = list(sim_calls.requests(col))
        pol, cache = make_policy("lru"), CacheConfig(per_layer=per_layer).build(model)
        costs = load_profile("rtx4090").cost_model(model)
        pol.reset(model, cache, costs)
        t0 = CLOCK()
        Simulation(model, pol, cache, costs).run(rs)
        return CLOCK() - t0

    ld, rq, pa, sm = best(load), best(reqs), best(policy_and_apply), best(simulate)
    us = 1e6 / n
    return (f"stages, lru, {per_layer} experts per layer, best of {repeats}, microseconds per layer-step:\n"
            f"trace from cache {ld * us:.2f} | requests {rq * us:.2f} | policy + apply {pa * us:.2f} | "
            f"compute stream, copy engine {(sm - pa) * us:.2f} | simulation {sm * us:.2f} | sum {(ld + rq + sm) * us:.2f}")


_BASELINE = r"""
import json, pickle, statistics, sys, time
sys.path.insert(0, sys.argv[1])
calls, n_layers, sizes, repeats, trace, clock = pickle.load(open(sys.argv[2], "rb"))
clock = time.process_time if clock == "cpu" else time.perf_counter
try:
    from lab.cache import CacheConfig
except ImportError:
    from sim.config import CacheConfig
from sim.replay import replay
sys.path.insert(0, sys.argv[3])
from replay_speed import plain_lru
out = {}
for k in sizes:
    rr, yy = [], []
    for _ in range(repeats):
        t0 = clock(); m = replay(trace, "lru", CacheConfig(per_layer=k)).metrics; rr.append(clock() - t0)
        t0 = clock(); h = plain_lru(calls, n_layers, k); yy.append(clock() - t0)
    assert h == m["hits"] + m["inflight_hits"]
    out[k] = [m["layer_calls"] / statistics.median(rr), statistics.median(a / b for a, b in zip(rr, yy))]
print(json.dumps(out))
"""


def baseline(folder: Path, calls: list[tuple[int, list[int]]], n_layers: int, sizes: list[int], repeats: int, trace: Path,
             clock: str) -> dict[str, list[float]]:
    """The same measurement of another checkout's `sim.replay` (`--baseline DIR`: e.g. a `git worktree` of
    an older commit), in a subprocess that imports that checkout first, against the same plain LRU."""
    import json
    import pickle
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as fh:
        pickle.dump((calls, n_layers, sizes, repeats, str(trace), clock), fh)
    try:
        r = subprocess.run([sys.executable, "-c", _BASELINE, str(folder), fh.name, str(ROOT / "bench")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(folder)})
    finally:
        os.unlink(fh.name)
    if r.returncode != 0:
        raise SystemExit(f"the baseline at {folder} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6], help="experts per layer")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also time another checkout's replay the same way (e.g. git worktree add DIR OLD_COMMIT)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="CPU seconds of this process (default: on a shared machine, what the work costs) or wall seconds")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    load0 = os.getloadavg()
    read_columnar(args.trace)  # the first read builds the cache; every replay below reads it
    replay(args.trace, "lru", CacheConfig(per_layer=4))  # warm imports
    calls, n_layers = lru_calls(args.trace)
    found = tools()
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, trace {args.trace.name}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"public tools: {', '.join(found) or 'none installed'}; clock: {args.clock} "
          f"({'time.process_time' if args.clock == 'cpu' else 'time.perf_counter'}); repeats {args.repeats}")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    extra = "".join(f" x {name} (its hit rate) |" for name in found)
    print(f"| policy | experts per layer | hit rate | layer-steps | median layer-steps/s | best layer-steps/s | x LRU |{extra} plain LRU layer-steps/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(found) + " ---: |")
    for k in args.sizes:
        r = measure(args.trace, k, args.repeats, calls, n_layers, found)
        tool_cols = "".join(f" {r[f'x_{name}']:.1f} ({r[f'{name}_hits'] / r['accesses']:.3f}) |" for name in found)
        print(f"| lru | {k} | {r['hit_rate']:.3f} | {r['n']} | {r['median']:,.0f} | {r['best']:,.0f} | {r['x_lru']:.1f} |{tool_cols} "
              f"{r['lru_rate']:,.0f} |")
    if args.baseline is not None:
        import subprocess

        rev = subprocess.run(["git", "-C", str(args.baseline), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        b = baseline(args.baseline, calls, n_layers, args.sizes, args.repeats, args.trace, args.clock)
        print(f"\nbaseline: {args.baseline} ({rev.stdout.strip()[:70] or 'not a git checkout'}), the same measurement:")
        print("| experts per layer | baseline median layer-steps/s | baseline x LRU |")
        print("| ---: | ---: | ---: |")
        for k in args.sizes:
            rate, ratio = b[str(k)]
            print(f"| {k} | {rate:,.0f} | {ratio:.1f} |")
    print()
    print(stages(args.trace, 4, args.repeats))
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
