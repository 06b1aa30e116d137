"""The on-disk cache of columnar traces (`traces.columnar`), keyed by the trace file's SHA-256.

A cache file is an uncompressed `.npz` (numpy arrays, no pickles) holding the columns, the digest of
the trace it was built from and the version of the reader that validated it. It lives beside the
trace (`.NAME.columnar.npz`, one per trace: a changed trace overwrites it) when that folder is
writable, else in the user's cache folder (`$XDG_CACHE_HOME/moe-offload-lab/traces/SHA256.npz`, by
default `~/.cache/...`). `MOE_LAB_TRACE_CACHE` changes that: `off` (or `0`, `no`) reads every trace
afresh and writes nothing, a folder path keeps every cache there.

A cache is only a shortcut: one that belongs to another file (a different digest), to another
reader (the rules changed), or that cannot be read whole (cut short, a bad CRC, arrays of the wrong
shape) is ignored and rebuilt, and a cache that cannot be written (a read-only disk) is skipped. It
is written to a temporary file and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from traces.columnar import ColumnarTrace
from traces.io import _umask

FORMAT = 1
_SOURCES = ("schema.py", "io.py", "columnar.py", "trace_cache.py")


def _reader_version() -> str:
    """A digest of the code that validates and builds the columns: a change to any rule (or to the
    layout) makes every cache built before it stale."""
    h = hashlib.sha256(f"format {FORMAT}".encode())
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:32]


READER = _reader_version()


def _setting() -> str:
    return os.environ.get("MOE_LAB_TRACE_CACHE", "").strip()


def enabled() -> bool:
    return _setting().lower() not in ("off", "0", "no", "false")


def user_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-offload-lab" / "traces"


def candidates(trace: Path, sha256: str) -> list[Path]:
    """Where a cache of `trace` may be, in the order they are tried."""
    setting = _setting()
    if setting and enabled():
        return [Path(setting).expanduser() / f"{sha256}.npz"]
    return [trace.parent / f".{trace.name}.columnar.npz", user_dir() / f"{sha256}.npz"]


# -- reading ----------------------------------------------------------------------------------------
_ARRAYS = ("step", "layer", "prefill", "row_ptr", "topk", "weights", "probs", "importance", "la_ptr", "la_target", "la_topk")
_OPT = ("probs", "lookahead", "importance", "plan", "measured")
_STEPS = ("pos", "step", "prefill", "seq_ptr", "seq", "latency")


def load(trace: Path, sha256: str, header: object) -> ColumnarTrace | None:
    """The cached columns of this very file (same digest, same reader), or None."""
    if not enabled():
        return None
    for path in candidates(trace, sha256):
        col = _read(path, sha256, header)
        if col is not None:
            col.path = trace
            return col
    return None


def _read(path: Path, sha256: str, header: object) -> ColumnarTrace | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != FORMAT or meta.get("reader") != READER or meta.get("sha256") != sha256:
                return None
            a = {name: z[name] for name in _ARRAYS}
            has = {name: z[f"has_{name}"] for name in _OPT}
            text = {name: (z[f"text_ptr_{name}"], bytes(z[f"text_{name}"])) for name in ("plan", "measured")}
            steps = {name: z[f"s_{name}"] for name in _STEPS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError):
        return None  # missing, cut short, a bad CRC, not ours: rebuilt
    from traces.schema import Footer, Header

    assert isinstance(header, Header)
    try:
        footer = None if meta.get("footer") is None else Footer.model_validate(meta["footer"])
    except ValueError:
        return None
    col = ColumnarTrace(
        path=path, sha256=sha256, header=header, footer=footer, truncated=bool(meta.get("truncated")), has=has, text=text,
        step_records=steps, **a,
    )
    return col if _consistent(col) else None


def _consistent(c: ColumnarTrace) -> bool:
    """The arrays fit together (a cache that loads but does not fit is not used)."""
    m = c.header.model
    n = len(c.step)
    try:
        ok = (
            c.step.dtype == np.int64 and c.layer.shape == (n,) and c.prefill.shape == (n,) and c.row_ptr.shape == (n + 1,)
            and c.topk.ndim == 2 and c.topk.shape[1] == m.top_k and c.weights.shape == c.topk.shape
            and int(c.row_ptr[0]) == 0 and int(c.row_ptr[-1]) == len(c.topk) and bool((np.diff(c.row_ptr) >= 1).all())
            and all(h.shape == (n,) and h.dtype == bool for h in c.has.values())
            and c.probs.ndim == 2 and c.probs.shape[1] == m.num_experts and len(c.probs) == int(c.ptr("probs")[-1])
            and len(c.importance) == int(c.ptr("importance")[-1])
            and c.la_ptr.shape == (n + 1,) and len(c.la_target) == int(c.la_ptr[-1])
            and len(c.la_topk) == int(c._la_rows()[-1])
            and all(len(p) == n + 1 and int(p[-1]) == len(b) for p, b in c.text.values())
            and (n == 0 or (int(c.layer.min()) >= 0 and int(c.layer.max()) < m.num_moe_layers))
            and (c.topk.size == 0 or (int(c.topk.min()) >= 0 and int(c.topk.max()) < m.num_experts))
            and len(c.step_records["seq_ptr"]) == len(c.step_records["pos"]) + 1
        )
    except (ValueError, IndexError, TypeError):
        return False
    return bool(ok)


# -- writing ----------------------------------------------------------------------------------------
def store(col: ColumnarTrace) -> Path | None:
    """Write the cache of `col` (beside its trace, else the user cache); returns where, or None."""
    if not enabled():
        return None
    meta = {
        "format": FORMAT, "reader": READER, "sha256": col.sha256, "truncated": col.truncated,
        "footer": None if col.footer is None else col.footer.model_dump(),
    }
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name in _ARRAYS:
        arrays[name] = getattr(col, name)
    for name in _OPT:
        arrays[f"has_{name}"] = col.has[name]
    for name, (ptr, blob) in col.text.items():
        arrays[f"text_ptr_{name}"] = ptr
        arrays[f"text_{name}"] = np.frombuffer(blob, dtype=np.uint8)
    for name in _STEPS:
        arrays[f"s_{name}"] = col.step_records[name]
    for path in candidates(col.path, col.sha256):
        if _write(path, arrays):
            return path
    return None


def _write(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: the mode a plain open() gives
        os.replace(tmp, path)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
