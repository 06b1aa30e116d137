"""The sweep file: its models, and `load_sweep`, which checks every key, value, trace, policy, hardware
profile and cache size before the first point runs and expands the grid into points."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lab.cache import CacheConfig
from lab.hardware import HardwareError, HardwareProfile, load_profile
from policies import (
    CacheError,
    PluginError,
    PolicyLike,
    PolicySpecError,
    as_policy,
    load_plugin,
    make_policy,
    parse_spec,
)
from policies.plugins import plugin_modules
from sim.assembly import ReplayError, check_policy
from sim.tomlpos import format_loc, key_lines, line_of
from traces.columnar import read_columnar
from traces.io import TraceError, TraceReader, file_digest
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
    plugins: list[str] = []  # modules (or .py files, relative to the sweep file) that register policies


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
class PolicyInfo:
    written: str  # as the sweep file gives it (or the spec of a Python object)
    canonical: str
    files: dict[str, str]  # files its parameters name -> sha256
    lossless: bool
    oracle: bool
    modules: list[str]  # the non-built-in modules its classes come from (config) and workers import
    obj: Any = None  # a Policy subclass or instance given in Python, handed to the workers as it is


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
    plugins: list[str] = field(default_factory=list)  # as imported: module names or absolute .py paths


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


def load_sweep(
    path: str | os.PathLike[str],
    *,
    full_trace_check: bool = True,
    plugins: Sequence[str] = (),
    policies: Sequence[PolicyLike] | None = None,
) -> Sweep:
    """Read and check a sweep file; raise SweepError with one line on any problem. With
    `full_trace_check`, every trace is read and validated to its footer (a bad line is found now, not
    in every point). `plugins` are imported besides the file's (`--plugin`); `policies` replaces the
    file's list (which may then be left out) with spec strings, Policy subclasses or instances."""
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
    if policies is not None and isinstance(data, dict):
        data = {**data, "policies": []}
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
    return _check(spec, path, where, full_trace_check, plugins, policies)


def _plugins(spec: SweepFile, base: Path, where: _Where, extra: Sequence[str]) -> list[str]:
    """Import the file's plugins (paths relative to its folder) and then `extra`; returns them as
    another process imports them (module names, absolute .py paths)."""
    out: list[str] = []
    for i, written in enumerate([*spec.plugins, *extra]):
        is_file = written.endswith(".py") or "/" in written or os.sep in written
        target = str(_resolve(base if i < len(spec.plugins) else Path.cwd(), written).resolve()) if is_file else written
        try:
            load_plugin(target)
        except PluginError as exc:
            if i < len(spec.plugins):
                raise where.error(["plugins", i], str(exc)) from None
            raise SweepError(str(exc)) from None
        if target not in out:
            out.append(target)
    return out


def _policy_info(base: Path, written: PolicyLike) -> PolicyInfo:
    if isinstance(written, str):
        resolved, files = _policy_spec(base, written)
        pol = make_policy(resolved)
        obj = None
    else:
        pol, files = as_policy(written), {}
        obj = written
        written = pol.spec
    modules = [m for m in plugin_modules(pol) if m != "__main__"]
    return PolicyInfo(written, pol.spec, files, bool(getattr(pol, "lossless", True)), pol.wants_future(), modules, obj)


def _check(
    spec: SweepFile, path: Path, where: _Where, full_trace_check: bool, extra_plugins: Sequence[str] = (),
    objects: Sequence[PolicyLike] | None = None,
) -> Sweep:
    base = path.parent
    plugins = _plugins(spec, base, where, extra_plugins)
    for key in ("traces", "policies", "hardware"):
        if key == "policies" and objects is not None:
            if not objects:
                raise SweepError(f"{path}: policies: the list given in Python is empty")
            continue
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
            if full_trace_check:  # every line validated; the columns cached for the workers (traces.trace_cache)
                read_columnar(p)
        except TraceError as exc:
            raise where.error(["traces", i], str(exc)) from None
        except OSError as exc:
            raise where.error(["traces", i], f"{p}: cannot read: {exc.strerror or exc}") from None
        sha = file_digest(p)
        if sha in seen_trace:
            raise where.error(["traces", i], f"the same trace as traces[{seen_trace[sha]}] (identical content)")
        seen_trace[sha] = i
        traces.append(TraceInfo(written, p, sha, reader.header))

    # policies: specs that build, that every trace carries the fields of; canonical spellings distinct
    policies: list[PolicyInfo] = []
    seen_pol: dict[str, int] = {}
    given: Sequence[PolicyLike] = spec.policies if objects is None else objects
    for i, written in enumerate(given):
        loc: list[str | int] = ["policies", i] if objects is None else []
        try:
            info = _policy_info(base, written)
            for t in traces:
                check_policy(t.header, make_policy(info.canonical) if info.obj is None else info.obj, t.written)
        except (PolicySpecError, ReplayError) as exc:
            if objects is not None:
                raise SweepError(f"{path}: policies[{i}] (given in Python): {exc}") from None
            raise where.error(loc, str(exc)) from None
        canon = info.canonical
        if canon in seen_pol:
            raise where.error(loc, f"{info.written!r} is the same policy as policies[{seen_pol[canon]}] ({canon})")
        seen_pol[canon] = i
        policies.append(info)

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
        for info in policies:
            canon, files, lossless, oracle = info.canonical, info.files, info.lossless, info.oracle
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
                    if info.modules:  # a plugin's policy: the same name from another module is another policy
                        config["policy_modules"] = info.modules
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
                    if plugins or info.modules:  # what the worker imports before building the policy
                        task["plugins"] = [*plugins, *(m for m in info.modules if m not in plugins)]
                    if info.obj is not None:
                        task["policy_obj"] = info.obj
                    points.append(Point(h, task, columns))
    if not points:
        raise where.error(["exclude"] if spec.exclude else [], f"the grid is empty: all {excluded} points are excluded")
    return Sweep(path, spec.description, traces, points, excluded, plugins)


def _tool() -> str:
    from sim.replay import TOOL

    return TOOL


def _check_excludes(
    spec: SweepFile,
    where: _Where,
    base: Path,
    traces: list[TraceInfo],
    policies: list[PolicyInfo],
    hardware: list[HardwareInfo],
) -> list[Callable[[dict[str, Any]], bool]]:
    """Each rule as a predicate over a point's fields; a value that names nothing in the grid is an error
    (a typo would otherwise exclude nothing, silently)."""
    rules = []
    trace_paths = {str(t.path) for t in traces}
    canon = {p.canonical for p in policies}
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

