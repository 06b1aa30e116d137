"""A 1,000-point sweep over a real-sized workload: a thousand prompts x 256 decode tokens x 32 MoE
layers = 8,192,000 layer-steps (Mixtral-8x7B shaped, top-2 of 8), built here.

    python bench/sweep_8m.py [--points 1000] [--jobs 2] [--full] [--out out/bench-8m]

The trace is written once to `OUT/synthetic-8m.jsonl.gz`: every prompt replays a window of 256 decode
steps of the real Mixtral routing in `traces/` (GSM8K and HumanEval joined, each prompt starting at
its own offset, seeded), so its locality is real routing's. The sweep is 10 policies x 20 cache sizes
x 5 cards = 1,000 points (`OUT/sweep.toml`).

Without `--full` the bench times what a 1,000-point run is made of, in this process: the first read
of the trace (parse, validate, write the columnar cache), the load of that cache (what every worker
process does once), and a sample of `--points` points (default 3, spread over the grid), each a whole
replay on the cached columns; it prints the projection to 1,000 points over `--jobs` processes and
the share of it spent parsing. `--full` runs the real thing (`python -m sim.sweep OUT/sweep.toml -o
OUT/results --jobs J`), hours on two cores; the command is printed either way. Times are CPU seconds
of this process (`time.process_time`) beside wall seconds, with the load average: on a shared machine
the CPU seconds are what the work costs.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traces.columnar import read_columnar  # noqa: E402
from traces.io import TraceReader  # noqa: E402
from traces.schema import Footer, Header, Recording  # noqa: E402

PROMPTS, TOKENS = 1000, 256
POLICIES = ["lru", "lfu", "lfu(decay=0.95)", "lfu(decay=0.9)", "lfu(decay=0.5)", "fifo", "random(seed=0)", "random(seed=1)",
            "random(seed=2)", "lru+lookahead(predictor=history)"]
PER_LAYER = [2, 3, 4, 5, 6, 7, 8]
EXPERTS = list(range(64, 257, 16))  # 13 global sizes
HARDWARE = ["rtx4090", "rtx3090", "a100-pcie", "h100-pcie", "rtx-a6000"]


def build(path: Path, prompts: int = PROMPTS, tokens: int = TOKENS, seed: int = 0) -> int:
    """Write the synthetic trace; returns its layer records."""
    real = [ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz", ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz"]
    header = TraceReader(real[0]).header
    steps: list[list[str]] = []  # per real step: its 32 layer lines' "topk":...,"weights":... parts
    for p in real:
        cur, last = [], None
        for rec in TraceReader(p).layer_records():
            if rec.step != last and cur:
                steps.append(cur)
                cur = []
            last = rec.step
            cur.append(f'"layer":{rec.layer},"tokens":1,"topk":[[{rec.topk[0][0]},{rec.topk[0][1]}]],'
                       f'"weights":[[{rec.weights[0][0]!r},{rec.weights[0][1]!r}]]}}')
        steps.append(cur)
    steps = [s for s in steps if len(s) == header.model.num_moe_layers]
    h = Header(model=header.model, recording=Recording(prompt_source=f"bench/sweep_8m.py: {prompts} prompts x {tokens} "
                                                                      "decode steps of the Mixtral traces' routing"))
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.open(tmp, "wt", compresslevel=1) as fh:
        fh.write(h.model_dump_json(exclude_none=True) + "\n")
        step = 0
        for prompt in range(prompts):
            start = rng.randrange(len(steps))
            for j in range(tokens):
                head = f'{{"kind":"layer","step":{step},"phase":"decode",'
                fh.write("".join(head + line + "\n" for line in steps[(start + j) % len(steps)]))
                fh.write(f'{{"kind":"step","step":{step},"phase":"decode","seq_ids":[{prompt}]}}\n')
                n += len(steps[0])
                step += 1
        fh.write(Footer(steps=step, layer_records=n).model_dump_json() + "\n")
    os.replace(tmp, path)
    return n


def sweep_file(path: Path, trace: Path) -> Path:
    text = (
        "# 1,000 points over the 8M-layer-step synthetic trace (bench/sweep_8m.py)\n"
        'description = "8M layer-steps: 10 policies x 20 cache sizes x 5 cards"\n'
        f"traces = [{str(trace.resolve())!r}]\n".replace("'", '"')
        + "policies = [" + ", ".join(f'"{p}"' for p in POLICIES) + "]\n"
        + "hardware = [" + ", ".join(f'"{h}"' for h in HARDWARE) + "]\n\n[cache]\n"
        + f"per_layer = {PER_LAYER}\nexperts = {EXPERTS}\npartition = \"global\"\n"
    )
    path.write_text(text)
    return path


def timed(fn):  # type: ignore[no-untyped-def]
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-8m")
    ap.add_argument("--points", type=int, default=3, help="points sampled (without --full)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="run the whole 1,000-point sweep")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="fewer prompts for a quick look (the 8M workload is 1000)")
    args = ap.parse_args()
    trace = args.out / ("synthetic-8m.jsonl.gz" if args.prompts == PROMPTS else f"synthetic-{args.prompts}p.jsonl.gz")
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not trace.exists():
        n, w, c = timed(lambda: build(trace, args.prompts))
        print(f"built {trace} ({n:,} layer records, {trace.stat().st_size / 1e6:.0f} MB) in {w:.0f} s wall, {c:.0f} s CPU")
    sweep = sweep_file(args.out / "sweep.toml", trace)
    command = f"python -m sim.sweep {sweep} -o {args.out / 'results'} --jobs {args.jobs}"
    print(f"sweep: {sweep} (1,000 points); full run: {command}")
    from traces import trace_cache
    from traces.io import file_digest

    for cached in trace_cache.candidates(trace, file_digest(trace)):  # a cold start: no cache of this trace yet
        cached.unlink(missing_ok=True)
    col, w_parse, c_parse = timed(lambda: read_columnar(trace))
    print(f"first read (parse, validate, write the cache): {w_parse:.1f} s wall, {c_parse:.1f} s CPU, {col.n:,} layer records")
    _, w_load, c_load = timed(lambda: read_columnar(trace))
    print(f"cached read (each worker, once): {w_load:.2f} s wall, {c_load:.2f} s CPU")
    if args.full:
        w0 = time.perf_counter()
        r = subprocess.run(command.split(), cwd=ROOT)
        print(f"full sweep: {time.perf_counter() - w0:.0f} s wall, exit {r.returncode}")
        return r.returncode
    from lab.cache import CacheConfig
    from sim.replay import replay

    grid = [(p, s, h) for p in POLICIES for s in [*({"per_layer": k} for k in PER_LAYER), *({"experts": e} for e in EXPERTS)]
            for h in HARDWARE]
    sample = [grid[(7 + i * 337) % len(grid)] for i in range(args.points)]  # spread over policies, sizes and cards
    cpu = []
    for pol, size, hw in sample:
        m, w, c = timed(lambda pol=pol, size=size, hw=hw: replay(trace, pol, CacheConfig(**size), hw).metrics)
        cpu.append(c)
        print(f"point {pol} {size} {hw}: {w:.1f} s wall, {c:.1f} s CPU, {m['layer_calls'] / c:,.0f} layer-steps/CPU-s, "
              f"hit rate {m['hit_rate']:.3f}")
    per_point = sum(cpu) / len(cpu)
    total = (1000 * per_point + args.jobs * c_load + c_parse) / args.jobs
    print(f"projected 1,000 points on {args.jobs} processes: {total / 3600:.2f} h of CPU per process "
          f"({per_point:.1f} CPU-s a point); parsing {c_parse + args.jobs * c_load:.1f} CPU-s of it, "
          f"{100 * (c_parse + args.jobs * c_load) / (total * args.jobs):.2f} %")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
