"""Streaming reader and atomic writer for `.jsonl` and `.jsonl.gz` traces.

The reader holds one line at a time, so memory does not grow with the trace. Every problem it finds
becomes one `TraceError` naming the file, the line and the field, because a researcher debugging a
converter needs to know *where*, not a pydantic traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from traces.schema import FORMAT, VERSION, Footer, Header, LayerRecord, StepRecord

Record = LayerRecord | StepRecord


class TraceError(Exception):
    """A bad trace: `str(err)` is one line, `path:line: field: what is wrong`."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = _one_line(self.path) if line is None else f"{_one_line(self.path)}:{line}"
        text = f"{where}: {_one_line(field)}: {_one_line(message)}" if field else f"{where}: {_one_line(message)}"
        super().__init__(text)


def _one_line(text: str) -> str:
    """Escape control characters: field names and paths come from the data, and a newline in one must not
    split the one-line message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _first_error(err: ValidationError) -> tuple[str, str]:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        # our own validators prefix the field they blame ("topk: ..."): use it as the field
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            loc = f"{loc}.{head}" if loc else head
            msg = rest
    return loc or "line", msg


def _open_binary(path: Path) -> IO[bytes]:
    """Lines are read as bytes and decoded one by one, so that a bad byte is blamed on its own line (a
    text wrapper decodes 8 KiB chunks: it blamed an earlier line, or raised outside any `try`)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


# what a damaged gzip stream raises: cut short (EOFError), bad header or CRC (OSError), bad deflate data
_COMPRESSED_ERRORS = (OSError, EOFError, zlib.error)


class TraceReader:
    """Iterate a trace's layer and step records after validating its header.

    `allow_truncated` lets a user replay a trace without a footer knowingly; `truncated` says
    afterwards whether it was.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_truncated: bool = False):
        self.path = Path(path)
        self.allow_truncated = allow_truncated
        self.footer: Footer | None = None
        self.truncated = False
        if not self.path.exists():
            raise TraceError(self.path, None, None, "no such file")
        if self.path.is_dir():
            raise TraceError(self.path, None, None, "is a directory, not a trace file")
        self.header = self._read_header()

    # -- header ------------------------------------------------------------------------------------
    def _read_header(self) -> Header:
        with _open_binary(self.path) as fh:
            try:
                raw = fh.readline()
            except _COMPRESSED_ERRORS as exc:
                raise TraceError(self.path, 1, None, f"unreadable: {exc}") from None
        line = self._decode(raw, 1)
        if not line.strip():
            raise TraceError(self.path, 1, None, "empty file: expected a header line")
        obj = self._json(line, 1)
        if not isinstance(obj, dict):
            raise TraceError(self.path, 1, None, "expected a JSON object")
        if obj.get("kind") != "header":
            raise TraceError(self.path, 1, "kind", f"expected 'header' first, got {obj.get('kind')!r} (missing header?)")
        if obj.get("format") != FORMAT:
            raise TraceError(self.path, 1, "format", f"expected {FORMAT!r}, got {obj.get('format')!r}")
        if obj.get("version") != VERSION:
            raise TraceError(
                self.path, 1, "version", f"unsupported version {obj.get('version')!r}; this reader reads {VERSION}"
            )
        return self._validate(Header, obj, 1)

    def _decode(self, raw: bytes, lineno: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(self.path, lineno, None, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None

    def _json(self, line: str, lineno: int) -> Any:
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(self.path, lineno, None, f"bad JSON: {exc.msg} at column {exc.colno}") from None

    def _validate(self, model: type[BaseModel], obj: Any, lineno: int) -> Any:
        try:
            return model.model_validate(obj)
        except ValidationError as exc:
            field, msg = _first_error(exc)
            raise TraceError(self.path, lineno, field, msg) from None

    # -- records -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        h = self.header.model
        n_layers, n_experts, top_k = h.num_moe_layers, h.num_experts, h.top_k
        flags = self.header.fields
        fields = [n for n in ("probs", "lookahead", "importance", "measured", "plan") if getattr(flags, n)]
        layer_records = 0
        steps_seen: set[int] = set()
        last_step = -1
        lineno = 1
        # reset, so that a second pass over the same reader does not meet the first pass's footer
        self.footer = None
        self.truncated = False
        with _open_binary(self.path) as fh:
            fh.readline()
            while True:
                try:
                    raw = fh.readline()
                except _COMPRESSED_ERRORS as exc:
                    if self.allow_truncated:
                        self.truncated = True
                        return
                    raise TraceError(self.path, lineno + 1, None, f"truncated or corrupt compressed data ({exc})") from None
                if not raw:
                    break
                lineno += 1
                if raw.startswith(b'{"kind":"layer"') and self.footer is None:
                    # fast path for the lines our writer makes: one validation straight from the bytes;
                    # anything it rejects goes through the careful path below for the precise message
                    try:
                        rec = LayerRecord.model_validate_json(raw)
                    except ValidationError:
                        pass
                    else:
                        row = rec.topk[0]
                        if not (
                            rec.tokens == 1  # a decode record: check it in one expression
                            and rec.layer < n_layers
                            and len(row) == top_k
                            and max(row) < n_experts
                            and rec.probs is None
                            and rec.lookahead is None
                            and not fields
                        ):
                            self._check_layer(rec, lineno, n_layers, n_experts, top_k, fields)
                        if rec.step < last_step:
                            raise TraceError(self.path, lineno, "step", f"{rec.step} goes back (previous record had step {last_step})")
                        last_step = rec.step
                        steps_seen.add(rec.step)
                        layer_records += 1
                        yield rec
                        continue
                if self.allow_truncated and not raw.endswith(b"\n"):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.truncated = True  # cut inside a multi-byte character
                        return
                else:
                    line = self._decode(raw, lineno)
                if not line.strip():
                    continue
                if self.footer is not None:
                    raise TraceError(self.path, lineno, "kind", "content after the footer")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    if self.allow_truncated and not line.endswith("\n"):
                        self.truncated = True  # a half-written last line
                        return
                    raise TraceError(self.path, lineno, None, f"bad JSON: {exc.msg} at column {exc.colno}") from None
                kind = obj.get("kind") if isinstance(obj, dict) else None
                if kind == "layer":
                    rec: LayerRecord = self._validate(LayerRecord, obj, lineno)
                    self._check_layer(rec, lineno, n_layers, n_experts, top_k, fields)
                    if rec.step < last_step:
                        raise TraceError(self.path, lineno, "step", f"{rec.step} goes back (previous record had step {last_step})")
                    last_step = rec.step
                    steps_seen.add(rec.step)
                    layer_records += 1
                    yield rec
                elif kind == "step":
                    yield self._validate(StepRecord, obj, lineno)
                elif kind == "footer":
                    self.footer = self._validate(Footer, obj, lineno)
                    if self.footer.layer_records != layer_records:
                        raise TraceError(
                            self.path, lineno, "layer_records",
                            f"footer counts {self.footer.layer_records} layer records, the file has {layer_records}",
                        )
                    if self.footer.steps != len(steps_seen):
                        raise TraceError(
                            self.path, lineno, "steps", f"footer counts {self.footer.steps} steps, the file has {len(steps_seen)}"
                        )
                elif kind == "header":
                    raise TraceError(self.path, lineno, "kind", "a second header")
                else:
                    raise TraceError(self.path, lineno, "kind", f"unknown record kind {kind!r} (expected layer, step or footer)")
        if self.footer is None:
            if not self.allow_truncated:
                raise TraceError(
                    self.path, lineno, None,
                    "truncated: no footer line (interrupted recording?); pass --allow-truncated to use it anyway",
                )
            self.truncated = True

    def _check_layer(
        self, rec: LayerRecord, lineno: int, n_layers: int, n_experts: int, top_k: int, fields: list[str]
    ) -> None:
        if rec.layer >= n_layers:
            raise TraceError(self.path, lineno, "layer", f"{rec.layer} out of range: the model has {n_layers} MoE layers")
        for i, row in enumerate(rec.topk):
            if len(row) != top_k:
                raise TraceError(self.path, lineno, f"topk.{i}", f"has {len(row)} experts, the model's top_k is {top_k}")
            for e in row:
                if e >= n_experts:
                    raise TraceError(self.path, lineno, f"topk.{i}", f"expert id {e} out of range: num_experts={n_experts}")
        if rec.probs is not None:
            for i, row in enumerate(rec.probs):
                if len(row) != n_experts:
                    raise TraceError(self.path, lineno, f"probs.{i}", f"has {len(row)} entries, num_experts={n_experts}")
        if rec.lookahead is not None:
            for key, rows in rec.lookahead.items():
                target = int(key)
                if not rec.layer < target < n_layers:
                    raise TraceError(
                        self.path, lineno, f"lookahead.{key}",
                        f"predicts layer {target}, which is not after layer {rec.layer} and below {n_layers}",
                    )
                for i, row in enumerate(rows):
                    if len(row) != top_k:
                        raise TraceError(self.path, lineno, f"lookahead.{key}.{i}", f"has {len(row)} experts, the model's top_k is {top_k}")
                    for e in row:
                        if e >= n_experts:
                            raise TraceError(self.path, lineno, f"lookahead.{key}", f"expert id {e} out of range")
        for name in fields:
            if getattr(rec, name) is None:
                raise TraceError(self.path, lineno, name, "missing, though the header's fields say every record has it")

    def layer_records(self) -> Iterator[LayerRecord]:
        for rec in self:
            if isinstance(rec, LayerRecord):
                yield rec


def read_header(path: str | os.PathLike[str]) -> Header:
    return TraceReader(path).header


def _umask() -> int:
    """The process umask: os can only read it by setting it, so set it back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a whole text file through a temporary file beside it and a rename: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TraceWriter:
    """Write a trace atomically: records go to a temporary file beside the target, which replaces the
    target only when `close()` has written the footer. An exception inside the `with` block leaves any
    earlier file at the target untouched and no partial file behind."""

    def __init__(self, path: str | os.PathLike[str], header: Header):
        self.path = Path(path)
        self.header = header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        raw = os.fdopen(fd, "wb")
        self._raw = raw
        if self.path.name.endswith(".gz"):
            # mtime=0 and no file name: the same records give byte-identical files
            self._bin: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
        else:
            self._bin = raw
        self._steps: set[int] = set()
        self._layer_records = 0
        self._closed = False
        self._write(header)

    def _write(self, model: BaseModel) -> None:
        self._bin.write(model.model_dump_json(exclude_none=True).encode() + b"\n")

    def write(self, rec: LayerRecord | StepRecord) -> None:
        if isinstance(rec, LayerRecord):
            self._steps.add(rec.step)
            self._layer_records += 1
        self._write(rec)

    def close(self) -> None:
        if self._closed:
            return
        self._write(Footer(steps=len(self._steps), layer_records=self._layer_records))
        if self._bin is not self._raw:
            self._bin.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        # mkstemp made the file 0600; give it the mode a plain open() would, so others can read the trace
        os.chmod(self._tmp, 0o666 & ~_umask())
        os.replace(self._tmp, self.path)
        self._closed = True

    def abort(self) -> None:
        if self._closed:
            return
        try:
            if self._bin is not self._raw:
                self._bin.close()
            self._raw.close()
        finally:
            self._tmp.unlink(missing_ok=True)
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks: what results cite to name the trace they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
