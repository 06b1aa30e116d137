"""The results of a sweep: `results.jsonl`, appended one fsynced row per finished point, read back
(a torn last line dropped) and exported as CSV or Parquet."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sim.sweep.spec import EXPORT_FORMATS, LOCK_FILE, RESULTS_FILE, SweepError
from traces.io import write_text_atomic


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
