"""Running the points of a sweep: `run_sweep` and its backends, a local process pool (forkserver) and
Ray tasks, with results appended as each point finishes."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sim.sweep.spec import Point, Sweep, SweepError
from sim.sweep.store import ResultStore
from sim.sweep.worker import _error_text, run_point


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
        root = str(Path(__file__).resolve().parents[2])
        plugin_dirs, plugin_modules = _plugin_sources(todo)
        if address:
            import lab
            import policies
            import sim
            import traces

            # the cluster's workers get the code: this package's and the plugins' (installed plugins
            # must be installed on the nodes too, or be packages Ray can ship)
            modules = [traces, policies, lab, sim, *plugin_modules]
            try:
                ray.init(address=address, include_dashboard=False, runtime_env={"py_modules": modules})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SweepError(
                    f"cannot use the Ray cluster at {address}: {msg} (is it running? with token authentication, "
                    "set RAY_AUTH_MODE=token and the cluster's token here too)"
                ) from None
        else:
            # a local Ray's workers run this interpreter: installed plugins are there; the folders of
            # plugins imported from sys.path or a file go on their PYTHONPATH
            pythonpath = os.pathsep.join(dict.fromkeys(x for x in (root, *plugin_dirs, os.environ.get("PYTHONPATH", "")) if x))
            # "local": a Ray of its own, even when another cluster runs on this machine (or RAY_ADDRESS names one)
            ray.init(address="local", num_cpus=jobs, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
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


def _plugin_sources(todo: list[Point]) -> tuple[list[str], list[Any]]:
    """For the plugins the points import: the folders a worker needs on its path, and the top-level
    modules of those that are not installed (what a cluster must be sent)."""
    dirs: list[str] = []
    modules: list[Any] = []
    for target in dict.fromkeys(t for p in todo for t in p.task.get("plugins", ())):
        name = Path(target).stem if target.endswith(".py") else target.split(".")[0]
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        if mod is None or not file:
            continue
        path = Path(file).resolve()
        folder = path.parent.parent if path.name == "__init__.py" else path.parent
        if "site-packages" in folder.parts or "dist-packages" in folder.parts:
            continue  # installed: the workers' interpreter finds it
        if str(folder) not in dirs:
            dirs.append(str(folder))
        if mod not in modules and path.name == "__init__.py":
            modules.append(mod)
    return dirs, modules


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs ray, which is not installed (pip install 'moe-offload-lab[dist]')") from None
    return ray



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


