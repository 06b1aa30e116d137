"""Running one point of a sweep in a worker process: the trace parsed once per process and kept, and
the point's metrics or an error row (a failing policy never crashes a sweep)."""

from __future__ import annotations

import copy
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cache import CacheConfig
from lab.hardware import HardwareProfile
from policies import load_plugins
from sim import calls
from sim.assembly import assemble
from sim.sweep.spec import SweepError
from traces.columnar import ColumnarTrace, read_columnar
from traces.schema import Header


@dataclass
class _Loaded:
    """A trace as a worker keeps it: its columns (`traces.columnar`), read once per process (from the
    on-disk cache that the sweep's own check wrote), and its future accesses once an oracle asks."""

    col: ColumnarTrace
    _future: Any = None

    @property
    def header(self) -> Header:
        return self.col.header

    def records(self, with_steps: bool = False) -> Iterator[Any]:
        """The engine's input, the step records too where the cost model reads contexts."""
        return calls.requests(self.col, with_steps=with_steps)

    def future(self) -> Any:
        if self._future is None:
            self._future = calls.future(self.col)
        return self._future


_TRACES: OrderedDict[str, _Loaded] = OrderedDict()  # per process, by sha256
_TRACES_KEPT = 4


def _load_trace(path: str, sha256: str) -> tuple[_Loaded, bool]:
    """The trace, parsed once per process and kept (the few most recent); returns (trace, parsed now)."""
    got = _TRACES.get(sha256)
    if got is not None:
        _TRACES.move_to_end(sha256)
        return got, False
    col = read_columnar(path)  # from the cache the sweep's check wrote: no parsing here
    if col.sha256 != sha256:
        raise SweepError(f"{path}: the trace changed since the sweep was checked (sha256 differs); rerun the sweep")
    loaded = _Loaded(col)
    _TRACES[sha256] = loaded
    while len(_TRACES) > _TRACES_KEPT:
        _TRACES.popitem(last=False)
    return loaded, True


def _policy(task: dict[str, Any]) -> Any:
    """The point's policy: its plugins imported first (a worker process starts with none), then built
    from its spec, or a fresh copy of the Policy object given in Python."""
    plugins = task.get("plugins")
    if plugins:
        load_plugins(plugins)
    obj = task.get("policy_obj")
    return task["policy"] if obj is None else copy.deepcopy(obj)


def _simulate(task: dict[str, Any], reuse_traces: bool) -> dict[str, Any]:
    """The metrics of one point, exactly as `sim.replay.replay` computes them (both assemble the run
    with `sim.assembly.assemble`; tests/test_sweep.py holds the two equal)."""
    from sim.replay import replay

    cache = CacheConfig(**task["cache"])
    profile = HardwareProfile.model_validate(task["profile"])
    policy = _policy(task)
    if not reuse_traces:
        res = replay(task["trace_path"], policy, cache, profile)
        if res.config["trace"]["sha256"] != task["trace_sha256"]:
            raise SweepError(f"{task['trace_path']}: the trace changed since the sweep was checked; rerun the sweep")
        return res.metrics
    loaded, _ = _load_trace(task["trace_path"], task["trace_sha256"])
    run = assemble(loaded.header, policy, cache, profile, future=loaded.future, source=task["trace_path"])
    assert run.costs is not None
    return run.simulation().run(loaded.records(with_steps=run.costs.dense_per_key_s > 0)).metrics()


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

