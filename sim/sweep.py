"""Design-space sweeps: every point of a grid of traces x policies x cache sizes x hardware, in parallel,
resumable.

    python -m sim.sweep SWEEP.toml -o RESULTS/ [--jobs N] [--backend local|ray] [--address ADDR]
        [--export csv|parquet ...] [--retry-errors] [--no-progress]

A sweep file (TOML, every key checked; paths relative to the file):

    description = "LRU against the bounds on Mixtral"      # optional
    traces = ["../traces/mixtral-8x7b-gsm8k.jsonl.gz"]
    policies = ["lru", "lfu(decay=0.9)", "belady"]         # spec strings, as in every CLI
    cache = {per_layer = [2, 3, 4], experts = [96, 128], gb = [20.0], partition = "global"}
    hardware = ["rtx4090", "a100-pcie", "profiles/mine.json"]

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
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lab.cache import CacheConfig
from lab.hardware import HardwareError, HardwareProfile, load_profile
from policies import CacheError, PolicySpecError, make_policy, parse_spec
from policies.costs import variant_bytes
from sim.tomlpos import format_loc, key_lines, line_of
from traces.cli import OneLineParser
from traces.io import TraceError, TraceReader, file_digest, write_text_atomic
from traces.schema import Header, ModelSpec

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".sweep.lock"
EXPORT_FORMATS = ("csv", "parquet")
GIB = 2**30
PROG = "sim.sweep"


class SweepError(ValueError):
    """A bad sweep file or results directory: `str(err)` is one line, `file:line: where: what`."""


# -- the sweep file ---------------------------------------------------------------------------------
PosInt = Annotated[int, Field(ge=1, strict=True)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Partition = Literal["global", "per_layer"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheGrid(_Strict):
    per_layer: list[PosInt] = []
    experts: list[PosInt] = []
    gb: list[PosFloat] = []
    partition: Partition | list[Partition] | None = None


def _one_or_many(t: Any) -> Any:
    return t | list[t] | None


class ExcludeRule(_Strict):
    trace: _one_or_many(str) = None  # type: ignore[valid-type]
    policy: _one_or_many(str) = None  # type: ignore[valid-type]
    hardware: _one_or_many(str) = None  # type: ignore[valid-type]
    per_layer: _one_or_many(PosInt) = None  # type: ignore[valid-type]
    experts: _one_or_many(PosInt) = None  # type: ignore[valid-type]
    gb: _one_or_many(PosFloat) = None  # type: ignore[valid-type]
    partition: _one_or_many(Partition) = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _not_empty(self) -> ExcludeRule:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError(f"an exclude rule needs at least one of: {', '.join(type(self).model_fields)}")
        return self


class SweepFile(_Strict):
    description: str = ""
    traces: list[str]
    policies: list[str]
    cache: CacheGrid
    hardware: list[str]
    exclude: list[ExcludeRule] = []


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


# -- validated sweep --------------------------------------------------------------------------------
@dataclass
class TraceInfo:
    written: str  # as the sweep file gives it
    path: Path  # resolved, absolute
    sha256: str
    header: Header

    @property
    def model(self) -> ModelSpec:
        return self.header.model


@dataclass
class HardwareInfo:
    written: str
    ref: str  # preset name or absolute path of the profile file
    profile: HardwareProfile


@dataclass
class Point:
    config_hash: str
    task: dict[str, Any]  # what a worker needs, all plain data
    columns: dict[str, Any]  # the row's config columns


@dataclass
class Sweep:
    path: Path
    description: str
    traces: list[TraceInfo]
    points: list[Point]
    excluded: int = 0


def _cache_label(req: dict[str, Any]) -> tuple[str, float]:
    for kind in ("per_layer", "experts", "gb"):
        if kind in req:
            return kind, req[kind]
    raise AssertionError(req)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


class _Where:
    """Turns a location in the sweep file into `file:line: key: ` for one-line errors."""

    def __init__(self, path: Path, text: str):
        self.path = path
        try:
            self.pos = key_lines(text)
        except Exception:  # positions are a courtesy: never let them hide the real error
            self.pos = {}

    def error(self, loc: Sequence[str | int], message: str) -> SweepError:
        line = line_of(self.pos, loc) if loc else None
        where = f"{self.path}:{line}" if line else str(self.path)
        key = format_loc(loc)
        return SweepError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _resolve(base: Path, written: str) -> Path:
    p = Path(written).expanduser()
    return p if p.is_absolute() else (base / p)


def _policy_spec(base: Path, written: str) -> tuple[str, dict[str, str]]:
    """The spec with file parameters (`trace=...`) resolved against the sweep file's folder; returns the
    spec to build and {path: sha256} of the files it names."""
    parts = parse_spec(written)
    files: dict[str, str] = {}
    out = []
    changed = False
    for name, params in parts:
        for k, v in list(params.items()):
            if k == "trace" and isinstance(v, str):
                p = _resolve(base, v).resolve()
                try:
                    TraceReader(p)
                except TraceError as exc:
                    raise PolicySpecError(f"policy {name!r}: parameter trace: {exc}") from None
                params[k] = str(p)
                files[str(p)] = file_digest(p)
                changed = True
        args = ", ".join(f"{k}={v!r}" for k, v in params.items())
        out.append(f"{name}({args})" if args else name)
    return ("+".join(out) if changed else written), files


def load_sweep(path: str | os.PathLike[str], *, full_trace_check: bool = True) -> Sweep:
    """Read and check a sweep file; raise SweepError with one line on any problem. With
    `full_trace_check`, every trace is read and validated to its footer (a bad line is found now, not
    in every point)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise SweepError(f"{path}: is a directory, not a sweep file") from None
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        line = None
        if "(at line " in msg:
            msg, _, at = msg.rpartition(" (at line ")
            line = at.split(",")[0].rstrip(")")
        raise SweepError(f"{path}:{line}: invalid TOML: {msg}" if line else f"{path}: invalid TOML: {msg}") from None
    where = _Where(path, text)
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        # pydantic names union branches in the location (`list[str]`, `constrained-int`): keep only our
        # keys and list indexes (and the unknown key of an extra_forbidden error, which comes last)
        known = {*SweepFile.model_fields, *CacheGrid.model_fields, *ExcludeRule.model_fields}
        raw_loc = list(err["loc"])
        loc = [
            p for i, p in enumerate(raw_loc)
            if isinstance(p, int) or p in known or (err["type"] == "extra_forbidden" and i == len(raw_loc) - 1)
        ]
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            model: type[BaseModel] = SweepFile
            if parent and parent[0] == "cache":
                model = CacheGrid
            elif parent and parent[0] == "exclude":
                model = ExcludeRule
            raise where.error(loc, f"unknown key {loc[-1]!r}; known: {', '.join(model.model_fields)}") from None
        if err["type"] == "missing":
            raise where.error(loc[:-1], f"missing key {format_loc(loc)!r}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise where.error(loc, msg) from None
    return _check(spec, path, where, full_trace_check)


def _check(spec: SweepFile, path: Path, where: _Where, full_trace_check: bool) -> Sweep:
    base = path.parent
    for key in ("traces", "policies", "hardware"):
        if not getattr(spec, key):
            raise where.error([key], "empty: the grid needs at least one entry (an empty list gives no points)")
    c = spec.cache
    if not (c.per_layer or c.experts or c.gb):
        raise where.error(["cache"], "empty: give at least one size in per_layer, experts or gb")
    partitions: list[str] = _as_list(c.partition) if c.partition is not None else ["global"]
    if c.partition is not None and not (c.experts or c.gb):
        raise where.error(["cache", "partition"], "applies to experts and gb sizes; per_layer sizes are always per_layer")
    for key in ("per_layer", "experts", "gb"):
        vals = getattr(c, key)
        if len(set(vals)) != len(vals):
            raise where.error(["cache", key], f"lists a size twice: {vals}")
    if len(set(partitions)) != len(partitions):
        raise where.error(["cache", "partition"], f"lists a partition twice: {partitions}")

    # traces: exist, valid, read to the end
    traces: list[TraceInfo] = []
    seen_trace: dict[str, int] = {}
    for i, written in enumerate(spec.traces):
        p = _resolve(base, written).resolve()
        try:
            reader = TraceReader(p)
            if full_trace_check:
                for _ in reader:
                    pass
        except TraceError as exc:
            raise where.error(["traces", i], str(exc)) from None
        except OSError as exc:
            raise where.error(["traces", i], f"{p}: cannot read: {exc.strerror or exc}") from None
        sha = file_digest(p)
        if sha in seen_trace:
            raise where.error(["traces", i], f"the same trace as traces[{seen_trace[sha]}] (identical content)")
        seen_trace[sha] = i
        traces.append(TraceInfo(written, p, sha, reader.header))

    # policies: specs that build; canonical spellings distinct
    policies: list[tuple[str, str, dict[str, str], bool, bool]] = []  # (written, canonical, files, lossless, oracle)
    seen_pol: dict[str, int] = {}
    for i, written in enumerate(spec.policies):
        try:
            resolved, files = _policy_spec(base, written)
            pol = make_policy(resolved)
        except PolicySpecError as exc:
            raise where.error(["policies", i], str(exc)) from None
        canon = pol.spec
        if canon in seen_pol:
            raise where.error(["policies", i], f"{written!r} is the same policy as policies[{seen_pol[canon]}] ({canon})")
        seen_pol[canon] = i
        policies.append((written, canon, files, bool(getattr(pol, "lossless", True)), pol.wants_future()))

    # hardware: presets or profile files, usable with every trace's model
    hardware: list[HardwareInfo] = []
    seen_hw: dict[str, int] = {}
    for i, written in enumerate(spec.hardware):
        is_file = written.endswith(".json") or "/" in written or os.sep in written
        ref = str(_resolve(base, written).resolve()) if is_file else written
        try:
            prof = load_profile(ref)
            for t in traces:
                prof.cost_model(t.model)
        except HardwareError as exc:
            raise where.error(["hardware", i], str(exc)) from None
        key = canonical_json(prof.model_dump())
        if key in seen_hw:
            raise where.error(["hardware", i], f"the same profile as hardware[{seen_hw[key]}]")
        seen_hw[key] = i
        hardware.append(HardwareInfo(written, ref, prof))

    # cache sizes: every request against every trace's model
    requests: list[tuple[list[str | int], dict[str, Any]]] = []
    for j, k in enumerate(c.per_layer):
        requests.append((["cache", "per_layer", j], {"per_layer": k}))
    for key in ("experts", "gb"):
        for j, v in enumerate(getattr(c, key)):
            for part in partitions:
                requests.append((["cache", key, j], {key: v, "partition": part}))
    for loc, req in requests:
        cfg = CacheConfig(**req)
        for t in traces:
            try:
                cfg.build(t.model)
            except CacheError as exc:
                raise where.error(loc, f"{exc} (trace {t.written})") from None

    rules = _check_excludes(spec, where, base, traces, policies, hardware)

    # the grid
    points: list[Point] = []
    excluded = 0
    by_hash: dict[str, str] = {}
    for t in traces:
        model = t.model
        for _, canon, files, lossless, oracle in policies:
            for hw in hardware:
                budget = hw.profile.expert_budget_bytes(model)
                for _, req in requests:
                    cfg = CacheConfig(**req)
                    part = cfg.resolved_partition
                    kind, value = _cache_label(req)
                    fields = {"trace": str(t.path), "policy": canon, "hardware": hw, kind: value, "partition": part}
                    if any(rule(fields) for rule in rules):
                        excluded += 1
                        continue
                    request = {**req, "partition": part}
                    config = {
                        "tool": _tool(),
                        "trace_sha256": t.sha256,
                        "policy": canon,
                        "policy_files": files,
                        "cache": request,
                        "hardware": hw.profile.model_dump(mode="json"),
                    }
                    h = config_hash(config)
                    slots = cfg.slots(model)
                    label = f"{canon} / {t.written} / {hw.written} / {kind}={value}"
                    if h in by_hash:
                        raise SweepError(f"{path}: two grid points are the same configuration: {by_hash[h]} and {label}")
                    by_hash[h] = label
                    columns = {
                        "trace": t.path.name,
                        "trace_path": str(t.path),
                        "trace_sha256": t.sha256,
                        "model": model.name,
                        "policy": canon,
                        "policy_name": parse_spec(canon)[0][0],
                        "lossless": lossless,
                        "oracle": oracle,
                        "cache_kind": kind,
                        "cache_size": value,
                        "partition": part,
                        "cache_slots": slots,
                        "cache_per_layer": slots / model.num_moe_layers,
                        "cache_gib": slots * model.expert_bytes / GIB,
                        "cache_fits": slots * model.expert_bytes <= budget,
                        "hardware": hw.profile.name,
                        "hardware_ref": hw.ref,
                        "hardware_source": hw.profile.source,
                    }
                    task = {
                        "config_hash": h,
                        "trace_path": str(t.path),
                        "trace_sha256": t.sha256,
                        "policy": canon,
                        "cache": request if kind != "per_layer" else {"per_layer": value},
                        "profile": config["hardware"],
                    }
                    points.append(Point(h, task, columns))
    if not points:
        raise where.error(["exclude"] if spec.exclude else [], f"the grid is empty: all {excluded} points are excluded")
    return Sweep(path, spec.description, traces, points, excluded)


def _tool() -> str:
    from sim.replay import TOOL

    return TOOL


def _check_excludes(
    spec: SweepFile,
    where: _Where,
    base: Path,
    traces: list[TraceInfo],
    policies: list[tuple[str, str, dict[str, str], bool, bool]],
    hardware: list[HardwareInfo],
) -> list[Callable[[dict[str, Any]], bool]]:
    """Each rule as a predicate over a point's fields; a value that names nothing in the grid is an error
    (a typo would otherwise exclude nothing, silently)."""
    rules = []
    trace_paths = {str(t.path) for t in traces}
    canon = {p[1] for p in policies}
    for i, rule in enumerate(spec.exclude):
        want: dict[str, set[Any]] = {}
        for key in type(rule).model_fields:
            val = getattr(rule, key)
            if val is None:
                continue
            loc = ["exclude", i, key]
            vals = _as_list(val)
            got: set[Any] = set()
            for v in vals:
                if key == "trace":
                    p = str(_resolve(base, v).resolve())
                    if p not in trace_paths:
                        raise where.error(loc, f"{v!r} is not one of the sweep's traces")
                    got.add(p)
                elif key == "policy":
                    try:
                        c = make_policy(_policy_spec(base, v)[0]).spec
                    except PolicySpecError as exc:
                        raise where.error(loc, str(exc)) from None
                    if c not in canon:
                        raise where.error(loc, f"{v!r} is not one of the sweep's policies")
                    got.add(c)
                elif key == "hardware":
                    match = [h for h in hardware if v in (h.written, h.ref, h.profile.name)]
                    if not match:
                        raise where.error(loc, f"{v!r} is not one of the sweep's hardware")
                    got.update(id(h) for h in match)
                elif key == "partition":
                    got.add(v)
                else:
                    grid = getattr(spec.cache, key)
                    if v not in grid:
                        raise where.error(loc, f"{v!r} is not one of the sweep's cache.{key} sizes {grid}")
                    got.add(v)
            want[key] = got

        def pred(fields: dict[str, Any], want: dict[str, set[Any]] = want) -> bool:
            for key, allowed in want.items():
                if key == "hardware":
                    if id(fields["hardware"]) not in allowed:
                        return False
                elif fields.get(key) not in allowed:
                    return False
            return True

        rules.append(pred)
    return rules


# -- running one point ------------------------------------------------------------------------------
@dataclass
class _Loaded:
    header: Header
    records: list[Any]
    _future: Any = None

    def future(self) -> Any:
        if self._future is None:
            from sim.engine import future_of

            self._future = future_of(self.records)
        return self._future


_TRACES: OrderedDict[str, _Loaded] = OrderedDict()  # per process, by sha256
_TRACES_KEPT = 4


def _load_trace(path: str, sha256: str) -> tuple[_Loaded, bool]:
    """The trace, parsed once per process and kept (the few most recent); returns (trace, parsed now)."""
    got = _TRACES.get(sha256)
    if got is not None:
        _TRACES.move_to_end(sha256)
        return got, False
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SweepError(f"{path}: the trace changed since the sweep was checked (sha256 differs); rerun the sweep")
    reader = TraceReader(path)
    loaded = _Loaded(reader.header, list(reader))
    _TRACES[sha256] = loaded
    while len(_TRACES) > _TRACES_KEPT:
        _TRACES.popitem(last=False)
    return loaded, True


def _simulate(task: dict[str, Any], reuse_traces: bool) -> dict[str, Any]:
    """The metrics of one point, exactly as `sim.replay.replay` computes them."""
    from sim.replay import replay

    cache = CacheConfig(**task["cache"])
    profile = HardwareProfile.model_validate(task["profile"])
    if not reuse_traces:
        res = replay(task["trace_path"], task["policy"], cache, profile)
        if res.config["trace"]["sha256"] != task["trace_sha256"]:
            raise SweepError(f"{task['trace_path']}: the trace changed since the sweep was checked; rerun the sweep")
        return res.metrics
    # the body of replay() on a trace parsed once per process; tests/test_sweep.py holds the two equal
    from sim.engine import Simulation

    loaded, _ = _load_trace(task["trace_path"], task["trace_sha256"])
    model = loaded.header.model
    pol = make_policy(task["policy"])
    ca = cache.build(model)
    costs = profile.cost_model(model, variant_bytes(model, pol))
    pol.reset(model, ca, costs, loaded.future() if pol.wants_future() else None)
    sim = Simulation(model, pol, ca, costs, copy_engines=profile.link.copy_engines)
    return sim.run(loaded.records).metrics()


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    msg = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {msg}{where}"


def run_point(task: dict[str, Any], reuse_traces: bool = True) -> tuple[dict[str, Any], bool]:
    """Run one point; never raises for a failing replay. Returns (the row's result part, whether this
    call parsed its trace)."""
    sha = task["trace_sha256"]
    kept_before = sha in _TRACES
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **_simulate(task, reuse_traces)}
    except Exception as exc:  # a failing policy or replay: an error row, never a crashed sweep
        result = {"status": "error", "error": _error_text(exc)}
    result["wall_s"] = time.perf_counter() - t0
    parsed = (sha in _TRACES and not kept_before) if reuse_traces else True
    return result, parsed


def _ray_point(task: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bool]:
    """A Ray task: the trace arrives as bytes through the object store and is kept in a file named by
    its digest, so a worker node needs no shared file system."""
    folder = Path(tempfile.gettempdir()) / "moe-offload-lab-traces"
    target = folder / f"{task['trace_sha256']}.jsonl"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    return run_point({**task, "trace_path": str(target)})


# -- results ------------------------------------------------------------------------------------------
class ResultStore:
    """`results.jsonl` in a folder, owned by one sweep at a time (an advisory lock), appended one fsynced
    line per point."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SweepError(f"{self.folder}: cannot create the results folder: {exc.strerror or exc}") from None
        if not self.folder.is_dir():
            raise SweepError(f"{self.folder}: not a folder")
        self.path = self.folder / RESULTS_FILE
        self._lock_fh = open(self.folder / LOCK_FILE, "a")  # noqa: SIM115  (held for the store's life)
        try:
            import fcntl

            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            self._lock_fh.close()
            raise SweepError(f"{self.folder}: another sweep is writing these results (lock {LOCK_FILE})") from None
        self.dropped_torn = 0
        self.rows = self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        rows, good_end, torn = read_rows_raw(self.path)
        if torn:
            # a line cut by a kill: drop it, or the next append would be glued onto it
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
            self.dropped_torn = torn
        return {r["config_hash"]: r for r in rows}

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, allow_nan=False, ensure_ascii=True) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self.rows[row["config_hash"]] = row

    def close(self) -> None:
        os.close(self._fd)
        self._lock_fh.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows_raw(path: Path) -> tuple[list[dict[str, Any]], int, int]:
    """Rows of a results file, the byte offset after the last complete line, and the length of a torn
    last line (0 if none). A bad line other than the last is an error."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    torn = len(data) - end
    rows = []
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SweepError(f"{path}:{lineno}: not a result row ({exc}); remove the line to continue") from None
        if not isinstance(row, dict) or not isinstance(row.get("config_hash"), str):
            raise SweepError(f"{path}:{lineno}: not a result row (no config_hash); remove the line to continue")
        rows.append(row)
    return rows, end, torn


def read_results(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every point of a results folder once (the last row of a hash wins), in file order."""
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise SweepError(f"{path}: no results (run python -m sim.sweep SWEEP.toml -o FOLDER first)")
    rows, _, _ = read_rows_raw(path)
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.pop(r["config_hash"], None)
        out[r["config_hash"]] = r
    return list(out.values())


def export(folder: str | os.PathLike[str], fmt: str) -> Path:
    """Write every row of a results folder as `results.csv` or `results.parquet` beside it."""
    folder = Path(folder)
    rows = read_results(folder)
    columns: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    target = folder / f"results.{fmt}"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        write_text_atomic(target, buf.getvalue())
    elif fmt == "parquet":
        pa, pq = _pyarrow()
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
        fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".parquet.tmp", dir=folder)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        raise SweepError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    return target


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SweepError("--export parquet needs pyarrow, which is not installed (pip install pyarrow)") from None
    return pa, pq


# -- running a sweep ----------------------------------------------------------------------------------
@dataclass
class RunSummary:
    points: int
    skipped: int = 0
    ran: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    parses: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    dropped_torn: int = 0


def _row(point: Point, result: dict[str, Any]) -> dict[str, Any]:
    status = result.pop("status")
    return {"config_hash": point.config_hash, "status": status, **point.columns, **result}


def run_sweep(
    sweep: Sweep,
    out: str | os.PathLike[str],
    *,
    jobs: int | None = None,
    backend: Literal["local", "ray"] = "local",
    address: str | None = None,
    progress: bool = False,
    reuse_traces: bool = True,
    retry_errors: bool = False,
) -> RunSummary:
    """Run the points of `sweep` not yet in `out`, appending each row as it finishes."""
    jobs = jobs or os.cpu_count() or 1
    with ResultStore(out) as store:
        done = {h for h, r in store.rows.items() if r.get("status") == "ok" or not retry_errors}
        todo = [p for p in sweep.points if p.config_hash not in done]
        summary = RunSummary(points=len(sweep.points), skipped=len(sweep.points) - len(todo), dropped_torn=store.dropped_torn)
        if not todo:
            return summary
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(
            total=len(todo), desc="sweep", unit=" pt", file=sys.stderr, disable=not progress,
            mininterval=0.5 if tty else 10.0, dynamic_ncols=tty, smoothing=0.1,
        )
        t0 = time.perf_counter()

        def finish(point: Point, result: dict[str, Any], parsed: bool) -> None:
            row = _row(point, result)
            store.append(row)
            summary.ran += 1
            summary.parses += int(parsed)
            if row["status"] != "ok":
                summary.errors.append(row)
                bar.set_postfix(errors=len(summary.errors), refresh=False)
            bar.update(1)

        try:
            if backend == "ray":
                _run_ray(todo, jobs, address, reuse_traces, finish)
            elif jobs == 1:
                for p in todo:
                    finish(p, *run_point(p.task, reuse_traces))
            else:
                _run_local(todo, jobs, reuse_traces, finish)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            bar.close()
            summary.wall_s = time.perf_counter() - t0
    return summary


def _ordered(todo: list[Point]) -> list[Point]:
    """Points grouped by trace (stable), so that a worker's kept traces are the ones it is running."""
    order = {sha: i for i, sha in enumerate(dict.fromkeys(p.task["trace_sha256"] for p in todo))}
    return sorted(todo, key=lambda p: order[p.task["trace_sha256"]])


def _run_local(todo: list[Point], jobs: int, reuse_traces: bool, finish: Callable[[Point, dict[str, Any], bool], None]) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # forkserver: workers start from a clean process (no threads of the driver, such as tqdm's monitor)
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    queue = _ordered(todo)
    # a bounded window of submitted points: the pool stays busy, and a stop leaves little to cancel
    window = max(4 * jobs, 8)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
        pending: dict[Any, Point] = {}
        it = iter(queue)
        try:
            while True:
                while len(pending) < window:
                    p = next(it, None)
                    if p is None:
                        break
                    pending[pool.submit(run_point, p.task, reuse_traces)] = p
                if not pending:
                    break
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    p = pending.pop(fut)
                    try:
                        result, parsed = fut.result()
                    except BrokenProcessPool as exc:
                        raise SweepError(
                            f"a worker process died ({exc}); the points finished so far are saved: rerun to resume"
                        ) from None
                    finish(p, result, parsed)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _run_ray(
    todo: list[Point], jobs: int, address: str | None, reuse_traces: bool, finish: Callable[[Point, dict[str, Any], bool], None]
) -> None:
    ray = _ray()
    started = False
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parent.parent)
        if address:
            import policies
            import sim
            import traces

            try:
                ray.init(address=address, include_dashboard=False, runtime_env={"py_modules": [traces, policies, sim]})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SweepError(
                    f"cannot use the Ray cluster at {address}: {msg} (is it running? with token authentication, "
                    "set RAY_AUTH_MODE=token and the cluster's token here too)"
                ) from None
        else:
            pythonpath = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH", "")) if x)
            ray.init(num_cpus=jobs, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(_ray_point)
        data: dict[str, Any] = {}
        pending: dict[Any, Point] = {}
        for p in _ordered(todo):
            sha = p.task["trace_sha256"]
            if sha not in data:
                data[sha] = ray.put(Path(p.task["trace_path"]).read_bytes())
            pending[remote.remote(p.task, data[sha])] = p
        try:
            while pending:
                refs = list(pending)
                finished, _ = ray.wait(refs, num_returns=1)  # block for one, then take whatever else is ready
                if len(refs) > 1:
                    first = set(finished)
                    more, _ = ray.wait([r for r in refs if r not in first], num_returns=len(refs) - 1, timeout=0)
                    finished += more
                for ref in finished:
                    p = pending.pop(ref)
                    try:
                        result, parsed = ray.get(ref)
                    except Exception as exc:  # the task itself died (worker lost, ...): an error row
                        result, parsed = {"status": "error", "error": _error_text(exc)}, False
                    finish(p, result, parsed)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs ray, which is not installed (pip install 'moe-offload-lab[dist]')") from None
    return ray


# -- CLI ------------------------------------------------------------------------------------------------
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
        sweep = load_sweep(args.sweep)
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


if __name__ == "__main__":
    raise SystemExit(main())
