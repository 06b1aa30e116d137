"""Design-space sweeps: every point of a grid of traces x policies x cache sizes x hardware, in parallel,
resumable.

    python -m sim.sweep SWEEP.toml -o RESULTS/ [--jobs N] [--backend local|ray] [--address ADDR]
        [--export csv|parquet ...] [--retry-errors] [--no-progress] [--plugin MODULE ...]

A sweep file (TOML, every key checked; paths relative to the file):

    description = "LRU against the bounds on Mixtral"      # optional
    traces = ["../traces/mixtral-8x7b-gsm8k.jsonl.gz"]
    policies = ["lru", "lfu(decay=0.9)", "belady"]         # spec strings, as in every CLI
    cache = {per_layer = [2, 3, 4], experts = [96, 128], gb = [20.0], partition = "global"}
    hardware = ["rtx4090", "a100-pcie", "profiles/mine.json"]
    plugins = ["my_policies.mru"]                          # optional: modules that register policies

    [[exclude]]                                            # any subset of the grid's fields
    policy = "belady"
    hardware = ["a100-pcie"]

`cache` takes any of `per_layer` (slots in each MoE layer), `experts` (total slots) and `gb` (GiB of
slots), each a list; `partition` (`global` or `per_layer`, or a list of both) applies to the `experts`
and `gb` sizes. An exclude rule drops the points that match every field it gives (a list matches any
of its values).

Everything is checked before the first point runs (keys, values, policy specs, hardware, every trace
read and validated in full, every cache size against every trace's top_k); a problem is one line on
stderr naming the sweep file and the line of the offending key, exit status 2.

Results: `RESULTS/results.jsonl`, one JSON row per finished point, appended and fsynced the moment
it finishes: the config columns, every metric of `sim.replay`, and `config_hash`, the sha256 of the
canonical JSON of the point's config (trace digest, canonical policy spec, cache request, the full
hardware profile, tool version). A rerun skips every hash already there, so a sweep stopped in any
way, SIGKILL included, and rerun ends with each point exactly once (a torn last line is dropped). A
point whose replay raises is recorded as an error row (`status: "error"`) and reported; reruns skip
it too unless `--retry-errors`. `--export csv` (or `parquet`, with pyarrow) writes
`RESULTS/results.csv` from all rows. Exit status: 0; 1 when some point failed; 130 when stopped by
Ctrl-C or SIGTERM (the finished points are saved: rerun to resume); 2 for a bad sweep file.

Backends: `local` (default) runs the points in a process pool of `--jobs` workers (default: every
core); each worker parses a trace once and keeps it for all its points of that trace. `ray` runs the
same points as Ray tasks on a local Ray (`--jobs` CPUs) or the cluster at `--address`; the trace
files travel through Ray's object store, so workers need no shared file system.

The package, by seam: `spec` (the sweep file, its checks and the grid), `worker` (one point in a worker
process), `store` (results.jsonl, reading and export), `backends` (`run_sweep`: process pool, Ray) and
`cli` (`python -m sim.sweep`).
"""

from sim.sweep.backends import RunSummary, run_sweep
from sim.sweep.cli import build_parser, main
from sim.sweep.spec import (
    EXPORT_FORMATS,
    LOCK_FILE,
    PROG,
    RESULTS_FILE,
    CacheGrid,
    ExcludeRule,
    HardwareInfo,
    Point,
    Sweep,
    SweepError,
    SweepFile,
    TraceInfo,
    canonical_json,
    config_hash,
    load_sweep,
)
from sim.sweep.store import ResultStore, export, read_results, read_rows_raw
from sim.sweep.worker import run_point

__all__ = [
    "EXPORT_FORMATS", "LOCK_FILE", "PROG", "RESULTS_FILE", "CacheGrid", "ExcludeRule", "HardwareInfo", "Point",
    "ResultStore", "RunSummary", "Sweep", "SweepError", "SweepFile", "TraceInfo", "build_parser", "canonical_json",
    "config_hash", "export", "load_sweep", "main", "read_results", "read_rows_raw", "run_point", "run_sweep",
]
