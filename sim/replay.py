"""Replay a trace under a policy, cache size and hardware profile.

    python -m sim.replay TRACE --policy SPEC (--cache-experts N [--partition global|per_layer]
        | --cache-per-layer K | --cache-gb X) [--hardware NAME|FILE] [--out result.json]
        [--timeline timeline.html] [--chrome-trace trace.json] [--allow-truncated] [--plugin MODULE ...] [--stream]

Prints a summary table. `--out` writes JSON with `config` (all that reproduces the run, the trace's
digest included) and `metrics`; identical inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lab.cache import GIB, CacheConfig
from lab.hardware import GB, HardwareError, HardwareProfile, load_profile, presets
from lab.versions import TOOL
from policies import CacheError, Future, LayerRequest, PolicyLike, PolicySpecError, load_plugins, names
from sim import calls
from sim.assembly import ReplayError, assemble
from sim.engine import SimResult, Timeline
from traces.cli import OneLineParser
from traces.columnar import read_columnar
from traces.io import Record, TraceError, TraceReader, file_digest, write_text_atomic

DEFAULT_HARDWARE = "rtx4090"


@dataclass
class ReplayResult:
    config: dict[str, Any]
    metrics: dict[str, Any]
    sim: SimResult
    profile: HardwareProfile
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps({"config": self.config, "metrics": self.metrics}, indent=2, sort_keys=True) + "\n"


def replay(
    trace: str | os.PathLike[str],
    policy: PolicyLike,
    cache: CacheConfig,
    hardware: str | HardwareProfile = DEFAULT_HARDWARE,
    *,
    allow_truncated: bool = False,
    timeline: Timeline | None = None,
    progress: bool = False,
    stream: bool = False,
) -> ReplayResult:
    """Replay `trace` and return its config and metrics. `policy` is a spec string, a Policy subclass or
    an instance (registered: see `policies.as_policy`). Raises TraceError, PolicySpecError, CacheError,
    HardwareError or ReplayError with a one-line message on bad input; the run is assembled by
    `sim.assembly.assemble`, as the sweep's points are.

    The trace is read into columns (`traces.columnar`), from its on-disk cache after the first
    read; `stream=True` reads it line by line instead (constant memory, no cache, the same numbers).
    Problems are found in the same order either way: the header, the hardware, the policy, the
    cache size, then the records (for an oracle, before its `reset`, which needs them all)."""
    path = Path(trace)
    header = TraceReader(path, allow_truncated=allow_truncated).header
    model = header.model
    profile = hardware if isinstance(hardware, HardwareProfile) else load_profile(hardware)
    col = None
    reader = None

    def future() -> Future:  # only an oracle asks, before its reset; read the records once
        nonlocal col
        if stream:
            return Future.from_records(TraceReader(path, allow_truncated=allow_truncated))
        col = read_columnar(path, allow_truncated=allow_truncated)
        return calls.future(col)

    run = assemble(header, policy, cache, profile, future=future, source=str(path))
    pol, ca, costs, notes = run.policy, run.cache, run.costs, run.notes
    assert costs is not None
    cache_bytes = ca.capacity * model.expert_bytes
    if stream:
        reader = TraceReader(path, allow_truncated=allow_truncated)
    elif col is None:
        col = read_columnar(path, allow_truncated=allow_truncated)  # cached by digest: a second replay skips parsing
    sim = run.simulation(timeline)
    records: Iterator[LayerRequest | Record]
    if col is not None:
        records, total, unit = calls.requests(col, with_steps=costs.dense_per_key_s > 0), col.n, " call"
    else:
        assert reader is not None
        records, total, unit = iter(reader), None, " rec"
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"replay {path.name}", total=total, unit=unit, unit_scale=True, file=sys.stderr,
                       leave=False, disable=None)
    result = sim.run(records)
    truncated = col.truncated if col is not None else bool(reader is not None and reader.truncated)
    if truncated:
        notes.append("the trace is truncated (no footer): replayed what it holds")
    notes.extend(pol.notes())  # how the policy ran (a look-ahead that fell back to history, ...)
    digest = col.sha256 if col is not None else file_digest(path)
    config = {
        "tool": TOOL,
        "trace": {"path": str(trace), "sha256": digest, "truncated": truncated},
        "model": model.model_dump(exclude={"expert_similarity"}),  # the matrix is the trace's (its sha256 above)
        "policy": pol.spec,
        "cache": {
            "request": cache.model_dump(exclude_none=True),
            "slots": ca.capacity,
            "partition": ca.partition,
            "bytes": cache_bytes,
        },
        "hardware": profile.model_dump(),
    }
    return ReplayResult(config, result.metrics(), result, profile, notes)


# -- CLI --------------------------------------------------------------------------------------------
def _fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.3f} ms" if x < 10 else f"{x:.2f} s"


def _pageable(link) -> str:  # type: ignore[no-untyped-def]
    """What the pageable share of the slow tier does to the copies (nothing when all is pinned)."""
    eff = link.effective_h2d_gbps()
    return "" if eff == link.h2d_gbps else f", {eff:.3g} GB/s with the pageable share"


def summary(res: ReplayResult) -> str:
    m, c = res.metrics, res.config
    model = c["model"]
    rows = [
        ("trace", f"{c['trace']['path']} ({model['name']}, {m['steps']} steps, {m['layer_calls']} layer calls)"),
        ("policy", c["policy"]),
        ("cache", f"{c['cache']['slots']} slots, {c['cache']['partition']} ({c['cache']['bytes'] / GIB:.2f} GiB)"),
        ("hardware", f"{res.profile.name} ({res.profile.source}: {res.profile.gpu.name}, "
                     f"{res.profile.link.h2d_gbps:g} GB/s H2D{_pageable(res.profile.link)})"),
        ("", ""),
        ("hit rate", f"{m['hit_rate']:.4f}  ({m['hits']} hits + {m['inflight_hits']} in flight / {m['accesses']} accesses)"),
        ("misses", f"{m['misses']}  ({m['bytes_h2d'] / GB:.2f} GB host-to-device)"),
        ("prefetches", f"{m['prefetches']} ({m['wasted_prefetches']} wasted)"),
        ("TTFT", _fmt_s(m["ttft_s"]) + ("" if m["ttft_s"] is not None else " (no prefill in trace)")),
        ("TPOT", _fmt_s(m["tpot_s"]) + (f"  ({1 / m['tpot_s']:.2f} tokens/s)" if m["tpot_s"] else "")),
        ("stall", f"{_fmt_s(m['stall_s'])} of {_fmt_s(m['total_s'])} total"),
        ("link busy", f"{m['link_busy_frac']:.3f}"),
        ("GPU busy", f"{m['gpu_busy_frac']:.3f}"),
        ("dropped mass", f"{m['dropped_mass']:.4f}"),
        ("substituted mass", f"{m['substituted_mass']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else "" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.replay", description="Replay an MoE routing trace under an offloading policy.")
    p.add_argument("trace", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--policy", default="lru", help=f"policy spec (default lru); known: {', '.join(names())}")
    size = p.add_argument_group("cache size (exactly one)")
    size.add_argument("--cache-experts", type=int, metavar="N", help="total expert slots")
    size.add_argument("--cache-per-layer", type=int, metavar="K", help="K slots in every MoE layer (per_layer partition)")
    size.add_argument("--cache-gb", type=float, metavar="X", help="slots that fit in X GiB (2^30 bytes, what vendors call GB)")
    p.add_argument("--partition", choices=["global", "per_layer"], help="share slots across layers (default) or split them")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help=f"preset ({', '.join(presets())}) or profile .json")
    p.add_argument("--out", type=Path, help="write config + metrics as JSON")
    p.add_argument("--timeline", type=Path, help="write a Gantt chart of the compute and copy streams (HTML)")
    p.add_argument("--chrome-trace", type=Path, metavar="FILE",
                   help="write the timeline as Chrome/Perfetto trace events (JSON; chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--timeline-steps", type=int, default=4, metavar="S", help="steps drawn in the timeline (default 4)")
    p.add_argument("--timeline-from", type=int, default=0, metavar="STEP", help="first step drawn (default 0)")
    p.add_argument("--allow-truncated", action="store_true", help="replay a trace that has no footer")
    p.add_argument("--stream", action="store_true",
                   help="read the trace line by line (constant memory, no cache) instead of into cached columns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (or a .py file) that registers policies first; repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "sim.replay"
    try:
        cache = CacheConfig(
            experts=args.cache_experts, per_layer=args.cache_per_layer, gb=args.cache_gb, partition=args.partition
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        msg = err["msg"].removeprefix("Value error, ")
        flag = {"experts": "--cache-experts", "per_layer": "--cache-per-layer", "gb": "--cache-gb"}.get(
            str(err["loc"][0]) if err["loc"] else "", ""
        )
        print(f"{prog}: error: {flag + ': ' if flag else ''}{msg}", file=sys.stderr)
        return 2
    if args.timeline_steps < 1 or args.timeline_from < 0:
        print(f"{prog}: error: --timeline-steps must be at least 1 and --timeline-from at least 0", file=sys.stderr)
        return 2
    timeline = Timeline(args.timeline_steps, args.timeline_from) if args.timeline or args.chrome_trace else None
    try:
        load_plugins(args.plugin)
        res = replay(
            args.trace, args.policy, cache, args.hardware, allow_truncated=args.allow_truncated, timeline=timeline,
            progress=not args.no_progress, stream=args.stream,
        )
    except (TraceError, PolicySpecError, CacheError, HardwareError, ReplayError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary(res))
    try:
        if args.out:
            write_text_atomic(args.out, res.to_json())
            print(f"\nwrote {args.out}")
        if timeline is not None:
            from sim.timeline import write_chrome_trace, write_timeline

            title = f"{res.config['policy']} on {Path(args.trace).name}"
            if args.timeline:
                write_timeline(timeline, args.timeline, title=title)
                print(f"wrote {args.timeline}")
            if args.chrome_trace:
                write_chrome_trace(timeline, args.chrome_trace, title=title)
                print(f"wrote {args.chrome_trace}")
    except OSError as exc:
        print(f"{prog}: error: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
