"""Convert routing logs of other tools into moe-trace files (DESIGN.md section 3).

`python -m traces.convert --from vllm-routing IN --model mixtral-8x7b [--dtype bf16] -o OUT`

Format `vllm-routing`: JSON Lines (optionally gzip-compressed, told by its magic bytes), one row per
(generated token, MoE layer) as written by routing-capture patches of vLLM's `FusedMoE.select_experts`:
`layer`, `token_idx`, `experts` (the top-k ids), `gating_probs` (the renormalised top-k weights) and an
optional `problem_id` (the sequence); other fields are ignored. Every (problem_id, token_idx) becomes one
decode step with one layer record per layer present. Such logs can lack rows (the patch dropped rows
whose weights were exactly [0.5, 0.5] as padding): a missing (token, layer) pair gets *no* record, since
inventing a routing decision would bias every hit rate computed from the trace; the converter counts the
gaps, reports them on stderr and writes the counts into the header's `recording`.

A bad input row stops the conversion with one line `IN:LINE: field: message` on stderr and exit code 2:
a converter that skipped bad rows would make traces that silently disagree with their source.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traces.cli import OneLineParser
from traces.io import TraceError, TraceWriter
from traces.models import PRESETS, model_preset
from traces.schema import Header, LayerRecord, ModelSpec, Recording, StepRecord

FORMATS = ("vllm-routing",)

DEFAULT_SOURCE = "vLLM routing capture (patched FusedMoE.select_experts): one JSON row per (generated token, MoE layer)"


class ConvertError(Exception):
    """One bad input row, rendered like a `TraceError`: `IN:LINE: field: message`."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        where = str(path) if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


@dataclass
class RoutingLog:
    """The rows of one vllm-routing file, grouped by (sequence, token) and then by layer."""

    rows: int = 0
    # (problem_id, token_idx) -> layer -> (experts, weights)
    tokens: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = field(default_factory=dict)
    datasets: set[str] = field(default_factory=set)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line); damaged compressed data becomes a `ConvertError` at its line."""
    try:
        with open(path, "rb") as probe:
            gz = probe.read(2) == b"\x1f\x8b"
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as exc:
        raise ConvertError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    lineno = 0
    with fh:
        while True:
            try:
                raw = fh.readline()
            except (OSError, EOFError, zlib.error) as exc:
                raise ConvertError(path, lineno + 1, None, f"truncated or corrupt compressed data ({exc})") from None
            if not raw:
                return
            lineno += 1
            yield lineno, raw


def _int(row: dict[str, Any], name: str, path: Path, lineno: int, default: int | None = None) -> int:
    if name not in row:
        if default is not None:
            return default
        raise ConvertError(path, lineno, name, "missing")
    v = row[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConvertError(path, lineno, name, f"expected a non-negative integer, got {v!r}")
    return v


def read_vllm_routing(path: Path, spec: ModelSpec) -> RoutingLog:
    """Load and validate every row against `spec`; the first bad row raises `ConvertError`."""
    log = RoutingLog()
    n_layers, n_experts, top_k = spec.num_moe_layers, spec.num_experts, spec.top_k
    for lineno, raw in _read_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConvertError(path, lineno, "line", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConvertError(path, lineno, "line", f"bad JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(row, dict):
            raise ConvertError(path, lineno, "line", f"expected a JSON object, got {type(row).__name__}")
        layer = _int(row, "layer", path, lineno)
        if layer >= n_layers:
            raise ConvertError(path, lineno, "layer", f"{layer} out of range: {spec.name} has {n_layers} MoE layers")
        token = _int(row, "token_idx", path, lineno)
        seq = _int(row, "problem_id", path, lineno, default=0)
        experts, weights = row.get("experts"), row.get("gating_probs")
        if experts is None:
            raise ConvertError(path, lineno, "experts", "missing")
        if weights is None:
            raise ConvertError(path, lineno, "gating_probs", "missing")
        if not isinstance(experts, list) or len(experts) != top_k:
            n = len(experts) if isinstance(experts, list) else type(experts).__name__
            raise ConvertError(path, lineno, "experts", f"expected a list of top_k={top_k} expert ids, got {n}")
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n_experts:
                raise ConvertError(path, lineno, "experts", f"expert id {e!r} out of range: num_experts={n_experts}")
        if len(set(experts)) != len(experts):
            raise ConvertError(path, lineno, "experts", f"repeats an expert id {experts}")
        if not isinstance(weights, list) or len(weights) != len(experts):
            n = len(weights) if isinstance(weights, list) else type(weights).__name__
            raise ConvertError(path, lineno, "gating_probs", f"expected {len(experts)} weights (one per expert), got {n}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ConvertError(path, lineno, "gating_probs", f"expected finite non-negative weights, got {w!r}")
        layers = log.tokens.setdefault((seq, token), {})
        if layer in layers:
            raise ConvertError(
                path, lineno, "layer", f"duplicate row for problem_id={seq} token_idx={token} layer={layer}"
            )
        layers[layer] = (experts, [float(w) for w in weights])
        if isinstance(row.get("dataset"), str):
            log.datasets.add(row["dataset"])
        log.rows += 1
    if log.rows == 0:
        raise ConvertError(path, None, None, "no routing rows")
    return log


@dataclass(frozen=True)
class Gaps:
    """What the log lacks: (token, layer) pairs of tokens that have some rows, and whole tokens."""

    missing_pairs: int
    incomplete_tokens: int
    missing_tokens: int  # token_idx values absent between a sequence's first and last token


def find_gaps(log: RoutingLog, n_layers: int) -> Gaps:
    pairs = sum(n_layers - len(layers) for layers in log.tokens.values())
    incomplete = sum(len(layers) < n_layers for layers in log.tokens.values())
    by_seq: dict[int, list[int]] = {}
    for seq, tok in log.tokens:
        by_seq.setdefault(seq, []).append(tok)
    whole = sum(max(toks) - min(toks) + 1 - len(toks) for toks in by_seq.values())
    return Gaps(pairs, incomplete, whole)


def write_trace(log: RoutingLog, header: Header, out: Path) -> tuple[int, int]:
    """Write steps in (problem_id, token_idx) order; returns (steps, layer records)."""
    records = 0
    steps = 0
    with TraceWriter(out, header) as writer:
        for step, (seq, tok) in enumerate(sorted(log.tokens)):
            layers = log.tokens[(seq, tok)]
            for layer in sorted(layers):
                experts, weights = layers[layer]
                writer.write(
                    LayerRecord(step=step, phase="decode", layer=layer, tokens=1, topk=[experts], weights=[weights])
                )
                records += 1
            writer.write(StepRecord(step=step, phase="decode", seq_ids=[seq]))
            steps += 1
    return steps, records


def convert_vllm_routing(
    src: Path, out: Path, model: str, dtype: str | None, *, source: str | None = None, prompt_source: str | None = None
) -> dict[str, Any]:
    """Convert one file; returns the summary that also goes into the header's `recording`."""
    spec = model_preset(model, dtype)
    log = read_vllm_routing(src, spec)
    gaps = find_gaps(log, spec.num_moe_layers)
    seqs = sorted({seq for seq, _ in log.tokens})
    if prompt_source is None:
        what = ", ".join(sorted(log.datasets)) or "unknown prompts"
        prompt_source = f"{what}: problem_id {', '.join(map(str, seqs))}"
    recording = Recording(
        link=None,
        policy=None,
        prompt_source=prompt_source,
        converter="traces.convert --from vllm-routing",
        source_file=src.name,
        source=source or DEFAULT_SOURCE,
        rows=log.rows,
        sequences=len(seqs),
        missing_pairs=gaps.missing_pairs,
        incomplete_tokens=gaps.incomplete_tokens,
        missing_tokens=gaps.missing_tokens,
    )
    steps, records = write_trace(log, Header(model=spec, recording=recording), out)
    return {
        "rows": log.rows,
        "sequences": len(seqs),
        "steps": steps,
        "layer_records": records,
        "missing_pairs": gaps.missing_pairs,
        "incomplete_tokens": gaps.incomplete_tokens,
        "missing_tokens": gaps.missing_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m traces.convert", description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN", type=Path, help="routing log (.jsonl or .jsonl.gz)")
    parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="format of IN")
    parser.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset for the header")
    parser.add_argument("--dtype", default=None, help="expert-weight dtype (default: the model's own, e.g. bf16)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="trace to write (.jsonl[.gz])")
    parser.add_argument("--source", default=None, help="where IN came from, kept in recording.source")
    parser.add_argument("--prompt-source", default=None, help="recording.prompt_source (default: from the rows)")
    args = parser.parse_args(argv)
    try:
        summary = convert_vllm_routing(
            args.input, args.output, args.model, args.dtype, source=args.source, prompt_source=args.prompt_source
        )
    except (ConvertError, TraceError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:  # unknown dtype
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # cannot write OUT
        print(f"{args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    s = summary
    print(
        f"{args.input}: {s['rows']} rows, {s['sequences']} sequences -> {args.output}: {s['steps']} decode steps, "
        f"{s['layer_records']} layer records; {s['missing_pairs']} (token, layer) pairs missing "
        f"({s['incomplete_tokens']} tokens incomplete, {s['missing_tokens']} tokens absent), no record written for them",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
