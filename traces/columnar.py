"""A trace held as numpy columns: read once, validated with vectorised checks, cached on disk.

`read_columnar(path)` gives a `ColumnarTrace`: one entry per layer record in flat arrays (`step`,
`layer`, `prefill`, and `row_ptr` into the token rows `topk` / `weights`), the optional per-record
fields as compact arrays with a presence mask, and the step records. The JSONL file stays the
interchange format; this is how a replay holds it, and what `traces.trace_cache` keeps on disk so that
the second replay of a trace (and every sweep point after the first) skips parsing.

Validation is the streaming reader's, by construction. A chunk of lines is parsed with the C JSON
scanner and its columns are checked with numpy (types, ranges, row shapes, distinct experts, steps
that never go back, one record per (step, layer), the header's `fields` promises, the footer's
counts). These checks only *accept*: anything they do not accept (a bad line, but also a line they
were not written for: leading blanks, a truncated file, a value pydantic would accept in a form
these checks do not parse) makes the trace go through `traces.io.TraceReader` instead, which raises
the exact one-line `file:line: field` error of the streaming reader (the first bad line), or returns
the records it accepts, from which the columns are built. So the columnar reader can never accept a
trace the streaming reader refuses, nor give different records (`tests/test_columnar.py` holds the
two to each other on many mutated traces).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np

from traces.io import Record, TraceError, TraceReader
from traces.schema import Footer, Header, LayerRecord, Measured, StepRecord

INT64_MAX = 2**63 - 1
_CHUNK_BYTES = 1 << 22  # lines are parsed and checked in chunks of about this many (decompressed) bytes
_WS = " \t\n\r"  # what json.loads allows around a value
_LAYER_KEYS = frozenset(("kind", "step", "phase", "layer", "tokens", "topk", "weights", "probs", "lookahead",
                         "importance", "plan", "measured"))
_LAYER_REQUIRED = ("step", "phase", "layer", "tokens", "topk", "weights")
_STEP_KEYS = frozenset(("kind", "step", "phase", "seq_ids", "latency_ns"))
_OPTIONAL = ("probs", "lookahead", "importance", "plan", "measured")


class _NotFast(Exception):
    """The vectorised checks do not accept this trace as it is: the streaming reader decides."""


@dataclass
class ColumnarTrace:
    """A validated trace as arrays. `n` layer records; `R` token rows in all.

    Record `i` has the token rows `row_ptr[i]:row_ptr[i + 1]` of `topk` (int64, R x top_k) and
    `weights` (float64, R x top_k). An optional field `f` of `probs` / `importance` has `has[f]`
    (bool, n) and rows only for the records that carry it (`ptr(f)`). `lookahead` is, per record,
    the entries `la_ptr[i]:la_ptr[i + 1]`, each a target layer `la_target` with the record's token
    rows in `la_topk` (in the order of the record's keys). `plan` and `measured` (which no engine
    reads) are kept as JSON text. Step records are kept with their place among the layer records,
    so `records()` gives back the file's records in the file's order.
    """

    path: Path
    sha256: str
    header: Header
    footer: Footer | None
    truncated: bool
    step: np.ndarray
    layer: np.ndarray
    prefill: np.ndarray
    row_ptr: np.ndarray
    topk: np.ndarray
    weights: np.ndarray
    has: dict[str, np.ndarray]
    probs: np.ndarray
    importance: np.ndarray
    la_ptr: np.ndarray
    la_target: np.ndarray
    la_topk: np.ndarray
    text: dict[str, tuple[np.ndarray, bytes]]  # plan / measured: (offsets n+1, utf-8 JSON of the records that carry it)
    step_records: dict[str, np.ndarray] = field(default_factory=dict)  # pos, step, prefill, seq_ptr, seq, latency

    @property
    def n(self) -> int:
        return len(self.step)

    @property
    def tokens(self) -> np.ndarray:
        return np.diff(self.row_ptr)

    def ptr(self, name: str) -> np.ndarray:
        """Row offsets of an optional row field (`probs`, `importance`): record i's rows are
        `ptr[i]:ptr[i + 1]` (empty where the record does not carry it)."""
        out = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.where(self.has[name], self.tokens, 0), out=out[1:])
        return out

    @property
    def steps(self) -> int:
        """Distinct steps of the layer records."""
        return int(np.count_nonzero(np.diff(self.step))) + 1 if self.n else 0

    # -- back to records ----------------------------------------------------------------------------
    def layer_record(self, i: int, ptrs: dict[str, np.ndarray] | None = None) -> LayerRecord:
        """Record `i` as the streaming reader gives it (built without validation: it was validated)."""
        ptrs = ptrs if ptrs is not None else {n: self.ptr(n) for n in ("probs", "importance")}
        a, b = int(self.row_ptr[i]), int(self.row_ptr[i + 1])
        extra: dict[str, Any] = {}
        if self.has["probs"][i]:
            p = ptrs["probs"]
            extra["probs"] = self.probs[p[i]:p[i + 1]].tolist()
        if self.has["importance"][i]:
            p = ptrs["importance"]
            extra["importance"] = self.importance[p[i]:p[i + 1]].tolist()
        if self.has["lookahead"][i]:
            rows = self._la_rows()
            extra["lookahead"] = {
                str(int(self.la_target[j])): self.la_topk[rows[j]:rows[j + 1]].tolist()
                for j in range(int(self.la_ptr[i]), int(self.la_ptr[i + 1]))
            }
        for name in ("plan", "measured"):
            if self.has[name][i]:
                off, blob = self.text[name]
                obj = json.loads(blob[off[i]:off[i + 1]])
                extra[name] = Measured.model_construct(**_measured(obj)) if name == "measured" else obj
        return LayerRecord.model_construct(
            step=int(self.step[i]), phase="prefill" if self.prefill[i] else "decode", layer=int(self.layer[i]),
            tokens=b - a, topk=self.topk[a:b].tolist(), weights=self.weights[a:b].tolist(),
            **{k: extra.get(k) for k in _OPTIONAL},
        )

    def _la_rows(self) -> np.ndarray:
        """First row in `la_topk` of every look-ahead entry."""
        cached = getattr(self, "_la_rows_cache", None)
        if cached is None:
            per_entry = np.repeat(self.tokens, np.diff(self.la_ptr))
            cached = np.zeros(len(per_entry) + 1, dtype=np.int64)
            np.cumsum(per_entry, out=cached[1:])
            self._la_rows_cache = cached
        return cached

    def step_record(self, j: int) -> StepRecord:
        s = self.step_records
        lat = int(s["latency"][j])
        return StepRecord.model_construct(
            step=int(s["step"][j]), phase="prefill" if s["prefill"][j] else "decode",
            seq_ids=s["seq"][s["seq_ptr"][j]:s["seq_ptr"][j + 1]].tolist(), latency_ns=None if lat < 0 else lat,
        )

    def records(self) -> Iterator[Record]:
        """Every layer and step record in file order, as `TraceReader` yields them."""
        ptrs = {n: self.ptr(n) for n in ("probs", "importance")}
        pos = self.step_records["pos"] if self.step_records else np.zeros(0, dtype=np.int64)
        j = 0
        for i in range(self.n):
            while j < len(pos) and pos[j] <= i:
                yield self.step_record(j)
                j += 1
            yield self.layer_record(i, ptrs)
        while j < len(pos):
            yield self.step_record(j)
            j += 1

    def layer_records(self) -> Iterator[LayerRecord]:
        ptrs = {n: self.ptr(n) for n in ("probs", "importance")}
        for i in range(self.n):
            yield self.layer_record(i, ptrs)

    def lookahead(self, i: int) -> dict[int, np.ndarray] | None:
        """Record i's look-ahead as a policy reads it: target layer -> (tokens, top_k) ids."""
        if not self.has["lookahead"][i]:
            return None
        rows = self._la_rows()
        return {int(self.la_target[j]): self.la_topk[rows[j]:rows[j + 1]] for j in range(int(self.la_ptr[i]), int(self.la_ptr[i + 1]))}


def _measured(obj: dict[str, Any]) -> dict[str, Any]:
    from traces.schema import ExpertLoad

    return {**obj, "loads": [ExpertLoad.model_construct(**ld) for ld in obj.get("loads", [])]}


# -- reading ----------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """A file read through this wrapper adds every byte to a SHA-256 (the trace's digest, computed in
    the same pass that parses it)."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha = fh, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.fh.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.sha.update(memoryview(b)[:n])
        return n or 0

    def rest(self) -> str:
        """Hash what the reader above did not consume; the digest of the whole file."""
        for chunk in iter(lambda: self.fh.read(1 << 20), b""):
            self.sha.update(chunk)
        return self.sha.hexdigest()


def read_columnar(path: str | os.PathLike[str], *, allow_truncated: bool = False, cache: bool = True) -> ColumnarTrace:
    """The trace at `path` as columns: from the on-disk cache when it holds this very file (same
    SHA-256, same reader), else parsed and validated, then cached (`traces.trace_cache`). Raises
    `TraceError` exactly where and as `TraceReader` does."""
    from traces import trace_cache
    from traces.io import file_digest

    reader = TraceReader(path, allow_truncated=allow_truncated)  # the header, with its own errors
    cache = cache and trace_cache.enabled()
    if cache:
        got = trace_cache.load(reader.path, file_digest(reader.path), reader.header)
        if got is not None:
            if got.truncated and not allow_truncated:
                for _ in reader:  # the streaming reader's error for a trace without a footer
                    pass
            return got
    col = build_columnar(reader)
    if cache:
        trace_cache.store(col)
    return col


def build_columnar(reader: TraceReader) -> ColumnarTrace:
    """Parse and validate the whole trace into columns (no cache). A trace whose header promises
    optional fields on every record (`probs`, `lookahead`, ...: a recording of the runtime) is read
    by the streaming reader straight away: pydantic reads such records faster than these checks."""
    if any(getattr(reader.header.fields, n) for n in _OPTIONAL):
        return _from_reader(reader)
    try:
        return _fast(reader)
    except _NotFast:
        return _from_reader(reader)


def _open_hashed(path: Path) -> tuple[IO[bytes], _HashingReader]:
    """The trace's lines (decompressed if gzip), hashing the file's bytes as they are read."""
    raw = open(path, "rb")
    gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    hashed = _HashingReader(raw)
    buffered = io.BufferedReader(hashed, buffer_size=1 << 20)
    return (gzip.GzipFile(fileobj=buffered, mode="rb") if gz else buffered), hashed


class _Columns:
    """Lists of per-chunk arrays, concatenated at the end."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}

    def add(self, name: str, value: Any) -> None:
        self.parts.setdefault(name, []).append(value)

    def cat(self, name: str, dtype: Any, shape: tuple[int, ...] = (0,)) -> np.ndarray:
        parts = self.parts.get(name)
        if not parts:
            return np.zeros(shape, dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False)


def _fast(reader: TraceReader) -> ColumnarTrace:
    h = reader.header
    model = h.model
    n_layers, n_experts, top_k = model.num_moe_layers, model.num_experts, model.top_k
    promised = [n for n in _OPTIONAL if getattr(h.fields, n)]
    cols = _Columns()
    scan = json.JSONDecoder().scan_once
    n_layer = 0
    footer: Footer | None = None
    last_step, last_layers = -1, np.zeros(0, dtype=np.int64)  # the step where the previous chunk ended
    text_parts: dict[str, list[bytes]] = {"plan": [], "measured": []}
    text_len: dict[str, list[np.ndarray]] = {"plan": [], "measured": []}
    fh, hashed = _open_hashed(reader.path)
    try:
        with fh:
            try:
                fh.readline()  # the header: TraceReader validated it
                rest = b""
                while True:
                    block = fh.read(_CHUNK_BYTES)
                    if not block:
                        if rest:
                            raise _NotFast  # a last line without its newline: the streaming reader decides
                        break
                    buf = rest + block if rest else block
                    cut = buf.rfind(b"\n") + 1
                    data, rest = buf[:cut], buf[cut:]
                    if not data:
                        continue
                    if footer is not None:
                        raise _NotFast  # content after the footer (or blank lines: the streaming reader decides)
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _NotFast from None
                    strs = text.split("\n")
                    strs.pop()  # after the last newline: nothing
                    is_layer = [x.startswith('{"kind":"layer"') for x in strs]
                    lay_lines = [x for x, f in zip(strs, is_layer, strict=True) if f]
                    if len(lay_lines) == len(strs):
                        others: list[tuple[int, str]] = []
                    else:
                        others = [(i, x) for i, (x, f) in enumerate(zip(strs, is_layer, strict=True)) if not f]
                    objs = [(i, _scan(scan, x)) for i, x in others]
                    if objs and objs[-1][1].get("kind") == "footer" and objs[-1][0] == len(strs) - 1:
                        footer = _footer(objs.pop()[1])
                        is_layer.pop()
                    if any(o.get("kind") != "step" for _, o in objs):
                        raise _NotFast  # a header, a footer inside, an unknown kind
                    if objs:
                        _step_records(cols, objs, n_layer, is_layer)
                    if lay_lines:
                        canon = _canonical(lay_lines, top_k) if not promised else None
                        if canon is not None:
                            last_step, last_layers = _layer_arrays(cols, *canon, n_layers, n_experts, top_k, last_step, last_layers)
                            _absent(cols, text_len, len(lay_lines))
                        else:
                            lay = [_scan(scan, x) for x in lay_lines]
                            if any(o.get("kind") != "layer" for o in lay):
                                raise _NotFast
                            last_step, last_layers = _layer_chunk(
                                cols, text_parts, text_len, lay, n_layers, n_experts, top_k, promised, last_step, last_layers
                            )
                        n_layer += len(lay_lines)
            except (OSError, EOFError, zlib.error):
                raise _NotFast from None
            digest = hashed.rest()
    finally:
        hashed.fh.close()
    if footer is None:
        raise _NotFast  # truncated: the streaming reader says so (or reads it, with allow_truncated)
    step = cols.cat("step", np.int64)
    steps = int(np.count_nonzero(np.diff(step))) + 1 if len(step) else 0
    if footer.layer_records != n_layer or footer.steps != steps:
        raise _NotFast
    return _assemble(reader, digest, footer, False, cols, text_parts, text_len, top_k, n_experts)


def _scan(scan: Any, line: str) -> dict[str, Any]:
    """One line as a JSON object, as `json.loads` reads it, or not fast."""
    try:
        obj, end = scan(line, 0)
    except (StopIteration, ValueError, RecursionError):
        raise _NotFast from None
    if end != len(line) and line[end:].strip(_WS):
        raise _NotFast
    if type(obj) is not dict:
        raise _NotFast
    return obj  # type: ignore[no-any-return]


_INT = r"(0|[1-9][0-9]{0,14})"  # a JSON integer below 2**53: exact as a float64
# a JSON number, but not the integer -0 (JSON's 0 for an integer, -0.0 for numpy's parse)
_NUM = r"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?[eE][+-]?[0-9]+|-?(?:0|[1-9][0-9]*)\.[0-9]+|0|-?[1-9][0-9]*)"
_CANONICAL: dict[int, re.Pattern[str]] = {}


def _canonical(lines: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The columns of one-token decode records exactly as `TraceWriter` writes them (no optional
    field, no blank, integers below 2**53), read with one regular expression and one numpy parse of
    the numbers; None if any line of the chunk is written otherwise (the JSON path reads it)."""
    pat = _CANONICAL.get(top_k)
    if pat is None:
        ids = ",".join([_INT] * top_k)
        ws = ",".join([_NUM] * top_k)
        pat = _CANONICAL[top_k] = re.compile(
            r'^\{"kind":"layer","step":' + _INT + r',"phase":"decode","layer":' + _INT + r',"tokens":1,"topk":\[\['
            + ids + r'\]\],"weights":\[\[' + ws + r'\]\]\}$', re.M)
    found = pat.findall("\n".join(lines))
    n = len(found)
    if n != len(lines):  # one match per line at most (anchored at both ends): every line matched
        return None
    groups = 2 + 2 * top_k
    vals = np.fromstring(",".join(chain.from_iterable(found)), sep=",")  # correctly rounded, as json's float()
    if vals.size != n * groups:
        return None
    vals = vals.reshape(n, groups)
    ints = vals[:, : 2 + top_k].astype(np.int64)
    ones = np.ones(n, dtype=np.int64)
    return ints[:, 0], ints[:, 1], ones, np.zeros(n, dtype=bool), np.ascontiguousarray(ints[:, 2:]), np.ascontiguousarray(vals[:, 2 + top_k:])


def _footer(obj: dict[str, Any]) -> Footer:
    if set(obj) != {"kind", "steps", "layer_records"}:
        raise _NotFast
    s, r = obj["steps"], obj["layer_records"]
    if type(s) is not int or type(r) is not int or not (0 <= s <= INT64_MAX and 0 <= r <= INT64_MAX):
        raise _NotFast
    return Footer(steps=s, layer_records=r)


def _ints(values: list[Any], lo: int = 0) -> np.ndarray:
    """int64 array of JSON integers (no bools, no floats) in [lo, INT64_MAX]."""
    if values and set(map(type, values)) != {int}:
        raise _NotFast
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:
        raise _NotFast from None
    if arr.size and int(arr.min()) < lo:
        raise _NotFast
    return arr


def _floats(values: list[Any]) -> np.ndarray:
    """float64 array of finite JSON numbers (ints allowed, as pydantic's strict float allows them)."""
    types = set(map(type, values))
    if not types <= {float, int}:
        raise _NotFast
    try:
        arr = np.array(values, dtype=np.float64)
    except OverflowError:
        raise _NotFast from None
    if not np.isfinite(arr).all():
        raise _NotFast
    return arr


def _rows(values: list[Any], width: int, count: np.ndarray, kind: str) -> np.ndarray:
    """Per record a list of `count[i]` rows of `width` numbers: the flat (sum(count), width) array."""
    if set(map(type, values)) != {list}:
        raise _NotFast
    if not np.array_equal(np.fromiter(map(len, values), np.int64, len(values)), count):
        raise _NotFast
    rows = list(chain.from_iterable(values))
    if rows and set(map(type, rows)) != {list}:
        raise _NotFast
    if rows and not (np.fromiter(map(len, rows), np.int64, len(rows)) == width).all():
        raise _NotFast
    flat = list(chain.from_iterable(rows))
    arr = _ints(flat) if kind == "int" else _floats(flat)
    return arr.reshape(len(rows), width)


def _layer_chunk(
    cols: _Columns, text_parts: dict[str, list[bytes]], text_len: dict[str, list[np.ndarray]], lay: list[dict[str, Any]],
    n_layers: int, n_experts: int, top_k: int, promised: list[str], last_step: int, last_layers: np.ndarray,
) -> tuple[int, np.ndarray]:
    layouts = set(map(frozenset, lay))
    present: set[str] = set()
    for keys in layouts:
        if not keys <= _LAYER_KEYS or not all(k in keys for k in _LAYER_REQUIRED):
            raise _NotFast
        present |= keys
    try:
        step = _ints([o["step"] for o in lay])
        layer = _ints([o["layer"] for o in lay])
        tokens = _ints([o["tokens"] for o in lay], lo=1)
    except KeyError:
        raise _NotFast from None
    phases = [o["phase"] for o in lay]
    if not all(type(p) is str for p in phases) or not set(phases) <= {"prefill", "decode"}:
        raise _NotFast
    prefill = np.fromiter(map("prefill".__eq__, phases), bool, len(phases))
    topk = _rows([o["topk"] for o in lay], top_k, tokens, "int")
    weights = _rows([o["weights"] for o in lay], top_k, tokens, "float")
    out = _layer_arrays(cols, step, layer, tokens, prefill, topk, weights, n_layers, n_experts, top_k, last_step, last_layers)
    n = len(lay)
    for name in _OPTIONAL:
        if name not in present:
            if name in promised:
                raise _NotFast  # "missing, though the header's fields say every record has it"
            cols.add(f"has_{name}", np.zeros(n, dtype=bool))
            if name in ("plan", "measured"):
                text_len[name].append(np.zeros(n, dtype=np.int64))
            elif name == "lookahead":
                cols.add("la_count", np.zeros(n, dtype=np.int64))
            continue
        vals = [o.get(name) for o in lay]
        has = np.fromiter((v is not None for v in vals), bool, n)
        if name in promised and not has.all():
            raise _NotFast
        cols.add(f"has_{name}", has)
        got = [v for v in vals if v is not None]
        idx = np.flatnonzero(has)
        if name == "probs":
            cols.add("probs", _rows(got, n_experts, tokens[idx], "float"))
        elif name == "importance":
            if set(map(type, got)) - {list}:
                raise _NotFast
            if not np.array_equal(np.fromiter(map(len, got), np.int64, len(got)), tokens[idx]):
                raise _NotFast
            cols.add("importance", _floats(list(chain.from_iterable(got))))
        elif name == "lookahead":
            _lookahead_chunk(cols, got, layer[idx], tokens[idx], n, has, n_layers, n_experts, top_k)
        else:
            lens = np.zeros(n, dtype=np.int64)
            blobs = []
            for i, v in zip(idx.tolist(), got, strict=True):
                if name == "plan":
                    if type(v) is not dict:
                        raise _NotFast
                    b = json.dumps(v, separators=(",", ":")).encode()
                else:
                    b = _measured_json(v)
                blobs.append(b)
                lens[i] = len(b)
            text_parts[name].extend(blobs)
            text_len[name].append(lens)
    return out


def _absent(cols: _Columns, text_len: dict[str, list[np.ndarray]], n: int) -> None:
    """No optional field on any of a chunk's `n` layer records."""
    for name in _OPTIONAL:
        cols.add(f"has_{name}", np.zeros(n, dtype=bool))
    cols.add("la_count", np.zeros(n, dtype=np.int64))
    for name in ("plan", "measured"):
        text_len[name].append(np.zeros(n, dtype=np.int64))


def _layer_arrays(
    cols: _Columns, step: np.ndarray, layer: np.ndarray, tokens: np.ndarray,
    prefill: np.ndarray, topk: np.ndarray, weights: np.ndarray, n_layers: int, n_experts: int, top_k: int, last_step: int,
    last_layers: np.ndarray,
) -> tuple[int, np.ndarray]:
    """The checks of a chunk's layer records that need no JSON (ranges, distinct experts, finite
    weights, steps that never go back, one record per (step, layer)), then its columns; returns the
    last step and its layers (the next chunk's records may continue that step)."""
    if int(layer.max()) >= n_layers or (topk.size and (int(topk.max()) >= n_experts or int(topk.min()) < 0)):
        raise _NotFast
    if int(step.min()) < 0 or int(layer.min()) < 0 or not np.isfinite(weights).all():
        raise _NotFast
    if len(step) > 1 and (np.diff(step) < 0).any() or int(step[0]) < last_step:
        raise _NotFast
    same = step == last_step
    if same.any() and np.isin(layer[same], last_layers).any():
        raise _NotFast
    order = np.lexsort((layer, step))
    ks, kl = step[order], layer[order]
    if len(ks) > 1 and ((ks[1:] == ks[:-1]) & (kl[1:] == kl[:-1])).any():
        raise _NotFast
    if top_k > 1 and topk.size:
        srt = np.sort(topk, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise _NotFast
    cols.add("step", step)
    cols.add("layer", layer)
    cols.add("prefill", prefill)
    cols.add("tokens", tokens)
    cols.add("topk", topk)
    cols.add("weights", weights)
    last = int(step[-1])
    return last, layer[step == last] if last != last_step else np.concatenate([last_layers, layer[step == last]])


def _measured_json(v: Any) -> bytes:
    """A `measured` value the strict schema accepts, as canonical JSON; anything else is not fast."""
    if type(v) is not dict or not set(v) <= {"start_ns", "end_ns", "stall_ns", "loads"} or not {"start_ns", "end_ns"} <= set(v):
        raise _NotFast
    ints = [v["start_ns"], v["end_ns"], v.get("stall_ns", 0)]
    loads = v.get("loads", [])
    if type(loads) is not list:
        raise _NotFast
    for ld in loads:
        if type(ld) is not dict or set(ld) != {"expert", "start_ns", "end_ns"}:
            raise _NotFast
        ints.extend((ld["expert"], ld["start_ns"], ld["end_ns"]))
    _ints(ints)
    out = {"start_ns": v["start_ns"], "end_ns": v["end_ns"], "stall_ns": v.get("stall_ns", 0),
           "loads": [{"expert": ld["expert"], "start_ns": ld["start_ns"], "end_ns": ld["end_ns"]} for ld in loads]}
    return json.dumps(out, separators=(",", ":")).encode()


_MAX_KEY_DIGITS = 4  # traces.schema: a look-ahead key names a layer (at most 4096 layers)


def _lookahead_chunk(cols: _Columns, got: list[Any], layer: np.ndarray, tokens: np.ndarray, n: int, has: np.ndarray,
                     n_layers: int, n_experts: int, top_k: int) -> None:
    if set(map(type, got)) - {dict}:
        raise _NotFast
    counts = np.zeros(n, dtype=np.int64)
    counts[has] = np.fromiter(map(len, got), np.int64, len(got))
    cols.add("la_count", counts)
    keys = list(chain.from_iterable(got))
    # canonical layer indices only: "01" and "1" name the same layer (the streaming reader's dict keeps
    # the later one), which these columns do not model
    if not all(k.isascii() and k.isdigit() and len(k) <= _MAX_KEY_DIGITS and str(int(k)) == k for k in keys):
        raise _NotFast
    target = np.array([int(k) for k in keys], dtype=np.int64)
    src = np.repeat(layer, counts[has])
    if target.size and ((target <= src) | (target >= n_layers)).any():
        raise _NotFast
    rows = list(chain.from_iterable(d.values() for d in got))
    la = _rows(rows, top_k, np.repeat(tokens, counts[has]), "int")
    if la.size and int(la.max()) >= n_experts:
        raise _NotFast
    cols.add("la_target", target)
    cols.add("la_topk", la)


def _step_records(cols: _Columns, stp: list[tuple[int, dict[str, Any]]], n_before: int, is_layer: list[bool]) -> None:
    """Step records of a chunk (with their line in it), with the number of layer records before each."""
    before = np.concatenate([[0], np.cumsum(np.array(is_layer, dtype=bool))])
    pos, steps, phases, seqs, lat, given = [], [], [], [], [], []
    for i, o in stp:
        if not set(o) <= _STEP_KEYS or "step" not in o or "phase" not in o:
            raise _NotFast
        pos.append(n_before + int(before[i]))
        steps.append(o["step"])
        phases.append(o["phase"])
        seq = o.get("seq_ids", [])
        if type(seq) is not list:
            raise _NotFast
        seqs.append(seq)
        v = o.get("latency_ns")
        if v is not None:
            given.append(v)
        lat.append(v)
    if not all(type(p) is str for p in phases) or not set(phases) <= {"prefill", "decode"}:
        raise _NotFast
    _ints(given)  # every latency given is a non-negative int64; -1 below is our own "none"
    flat = list(chain.from_iterable(seqs))
    cols.add("s_pos", np.array(pos, dtype=np.int64))
    cols.add("s_step", _ints(steps))
    cols.add("s_prefill", np.array([p == "prefill" for p in phases], dtype=bool))
    cols.add("s_seq_len", np.array([len(s) for s in seqs], dtype=np.int64))
    cols.add("s_seq", _ints(flat, lo=-INT64_MAX - 1))
    cols.add("s_latency", np.array([-1 if v is None else v for v in lat], dtype=np.int64))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _assemble(reader: TraceReader, digest: str, footer: Footer | None, truncated: bool, cols: _Columns,
              text_parts: dict[str, list[bytes]], text_len: dict[str, list[np.ndarray]], top_k: int, n_experts: int) -> ColumnarTrace:
    tokens = cols.cat("tokens", np.int64)
    n = len(tokens)
    has = {name: cols.cat(f"has_{name}", bool) for name in _OPTIONAL}
    for name in _OPTIONAL:
        if len(has[name]) != n:
            has[name] = np.zeros(n, dtype=bool)
    text = {}
    for name in ("plan", "measured"):
        lens = np.concatenate(text_len[name]) if text_len[name] else np.zeros(n, dtype=np.int64)
        text[name] = (_offsets(lens), b"".join(text_parts[name]))
    la_count = cols.cat("la_count", np.int64)
    if len(la_count) != n:
        la_count = np.zeros(n, dtype=np.int64)
    return ColumnarTrace(
        path=reader.path, sha256=digest, header=reader.header, footer=footer, truncated=truncated,
        step=cols.cat("step", np.int64), layer=cols.cat("layer", np.int64), prefill=cols.cat("prefill", bool),
        row_ptr=_offsets(tokens), topk=cols.cat("topk", np.int64, (0, top_k)).reshape(-1, top_k),
        weights=cols.cat("weights", np.float64, (0, top_k)).reshape(-1, top_k), has=has,
        probs=cols.cat("probs", np.float64, (0, n_experts)).reshape(-1, n_experts),
        importance=cols.cat("importance", np.float64), la_ptr=_offsets(la_count),
        la_target=cols.cat("la_target", np.int64), la_topk=cols.cat("la_topk", np.int64, (0, top_k)).reshape(-1, top_k),
        text=text,
        step_records={
            "pos": cols.cat("s_pos", np.int64), "step": cols.cat("s_step", np.int64), "prefill": cols.cat("s_prefill", bool),
            "seq_ptr": _offsets(cols.cat("s_seq_len", np.int64)), "seq": cols.cat("s_seq", np.int64),
            "latency": cols.cat("s_latency", np.int64),
        },
    )


def _from_reader(reader: TraceReader) -> ColumnarTrace:
    """The careful path: the streaming reader validates (and raises its own error); its records become
    the columns."""
    from traces.io import file_digest

    h = reader.header.model
    cols = _Columns()
    text_parts: dict[str, list[bytes]] = {"plan": [], "measured": []}
    text_len: dict[str, list[np.ndarray]] = {"plan": [], "measured": []}
    n = 0
    steps: list[tuple[int, StepRecord]] = []
    buf: list[LayerRecord] = []

    def flush() -> None:
        if not buf:
            return
        k = len(buf)
        cols.add("step", np.array([r.step for r in buf], dtype=np.int64))
        cols.add("layer", np.array([r.layer for r in buf], dtype=np.int64))
        cols.add("prefill", np.array([r.phase == "prefill" for r in buf], dtype=bool))
        cols.add("tokens", np.array([r.tokens for r in buf], dtype=np.int64))
        cols.add("topk", np.array([row for r in buf for row in r.topk], dtype=np.int64).reshape(-1, h.top_k))
        cols.add("weights", np.array([row for r in buf for row in r.weights], dtype=np.float64).reshape(-1, h.top_k))
        for name in _OPTIONAL:
            has = np.array([getattr(r, name) is not None for r in buf], dtype=bool)
            cols.add(f"has_{name}", has)
            got = [r for r in buf if getattr(r, name) is not None]
            if name == "probs" and got:
                cols.add("probs", np.array([row for r in got for row in r.probs], dtype=np.float64).reshape(-1, h.num_experts))
            elif name == "importance" and got:
                cols.add("importance", np.array([x for r in got for x in r.importance], dtype=np.float64))
            elif name == "lookahead":
                cnt = np.zeros(k, dtype=np.int64)
                targets, rows = [], []
                for i, r in enumerate(buf):
                    if r.lookahead is None:
                        continue
                    la = {int(key): v for key, v in r.lookahead.items()}  # what request_from_record makes of it
                    cnt[i] = len(la)
                    for t, v in la.items():
                        targets.append(t)
                        rows.extend(v)
                cols.add("la_count", cnt)
                if targets:
                    cols.add("la_target", np.array(targets, dtype=np.int64))
                    cols.add("la_topk", np.array(rows, dtype=np.int64).reshape(-1, h.top_k))
            elif name in ("plan", "measured"):
                lens = np.zeros(k, dtype=np.int64)
                for i, r in enumerate(buf):
                    v = getattr(r, name)
                    if v is None:
                        continue
                    b = json.dumps(v, separators=(",", ":")).encode() if name == "plan" else v.model_dump_json().encode()
                    text_parts[name].append(b)
                    lens[i] = len(b)
                text_len[name].append(lens)
        buf.clear()

    try:
        for rec in reader:
            if isinstance(rec, LayerRecord):
                buf.append(rec)
                n += 1
                if len(buf) >= 65536:
                    flush()
            else:
                steps.append((n, rec))
        flush()
        if steps:
            _steps_from_records(cols, steps)
    except OverflowError:  # a schema that bounds every integer by int64 (traces.schema) never gets here
        raise TraceError(reader.path, None, None, "an integer beyond the int64 range the simulator keeps") from None
    return _assemble(reader, file_digest(reader.path), reader.footer, reader.truncated, cols, text_parts, text_len,
                     h.top_k, h.num_experts)


def _steps_from_records(cols: _Columns, steps: list[tuple[int, StepRecord]]) -> None:
    if steps:
        cols.add("s_pos", np.array([p for p, _ in steps], dtype=np.int64))
        cols.add("s_step", np.array([s.step for _, s in steps], dtype=np.int64))
        cols.add("s_prefill", np.array([s.phase == "prefill" for _, s in steps], dtype=bool))
        cols.add("s_seq_len", np.array([len(s.seq_ids) for _, s in steps], dtype=np.int64))
        cols.add("s_seq", np.array([x for _, s in steps for x in s.seq_ids], dtype=np.int64))
        cols.add("s_latency", np.array([-1 if s.latency_ns is None else s.latency_ns for _, s in steps], dtype=np.int64))
