"""How many positions each layer call's token rows attend to, from the trace alone.

Attention's cost grows with the context: a decode row at context length L attends to L + 1
positions (itself included), a prefill chunk of n rows after c earlier positions to
n * c + n (n + 1) / 2. The engine charges `CostModel.dense_per_key_s` per attended position on top
of the dense part's cost by token rows (`docs/trace-format.md`, "Context length").

The context is derived from the records, in order:
- with `step` lines that carry `seq_ids` (the recorder writes them after each step's layer records):
  every sequence's context is the rows it had in earlier steps; a step's `tokens` rows are split
  evenly between its sequences (the first ones take the remainder); a new id starts at 0. The
  records of a step are held back until its `step` line (or the next step's first record) arrives;
- without them: one sequence at a time, and a prefill step that follows a decode step starts a
  new one (a new prompt).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from policies import LayerRequest
from traces.schema import LayerRecord, StepRecord


def _keys(rows: int, before: int) -> int:
    """Positions attended by `rows` new rows after `before` earlier ones (causal, self included)."""
    return rows * before + rows * (rows + 1) // 2


class ContextTracker:
    def __init__(self) -> None:
        self.seq_ctx: dict[int, int] = {}  # sequence id -> positions so far
        self.single = 0  # positions of the current sequence when the trace names none
        self.prev_phase: str | None = None
        self.prev_seqs: list[int] | None = None

    def step_keys(self, phase: str, tokens: int, seq_ids: list[int] | None) -> int:
        """The positions one layer call of this step attends to; advances the contexts."""
        new_prompt = phase == "prefill" and self.prev_phase == "decode"
        self.prev_phase = phase
        if seq_ids:
            seqs: list[int] | None = list(seq_ids)
        elif self.prev_seqs and not new_prompt:  # a step without its step line: the last one's sequences go on
            seqs = self.prev_seqs
        else:
            seqs = None
        self.prev_seqs = seqs
        if seqs is None:
            if new_prompt:
                self.single = 0
            keys = _keys(tokens, self.single)
            self.single += tokens
            return keys
        per, rem = divmod(tokens, len(seqs))
        keys = 0
        for i, q in enumerate(seqs):
            r = per + (1 if i < rem else 0)
            c = self.seq_ctx.get(q, 0)
            keys += _keys(r, c)
            self.seq_ctx[q] = c + r
        return keys


def with_keys(records: Iterable[LayerRecord | StepRecord]) -> Iterator[tuple[LayerRecord, int]]:
    """Every layer record with the positions its rows attend to (see the module's docstring)."""
    tracker = ContextTracker()
    buf: list[LayerRecord] = []

    def flush(seq_ids: list[int] | None) -> Iterator[tuple[LayerRecord, int]]:
        keys = tracker.step_keys(buf[0].phase, buf[0].tokens, seq_ids)
        for r in buf:
            yield r, keys
        buf.clear()

    for rec in records:
        if isinstance(rec, StepRecord):
            if buf and rec.step == buf[0].step:
                yield from flush(rec.seq_ids or None)
            continue
        if not isinstance(rec, (LayerRecord, LayerRequest)):
            continue
        if buf and rec.step != buf[0].step:
            yield from flush(None)
        buf.append(rec)
    if buf:
        yield from flush(None)
