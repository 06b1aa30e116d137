"""The engine's input from a columnar trace: one `LayerRequest` per layer record, built from the
arrays of `traces.columnar` without a pydantic record or nested lists in between.

The access order of a call (DESIGN section 4: distinct experts by decreasing summed weight, ties to
the lower id) is computed for a chunk of one-token calls at once with numpy; its keys, its
per-expert token counts and its routing mass are what `LayerRequest` would compute from the rows, to
the last bit (the sums run in the same order). Calls of several token rows (prefill) compute theirs
lazily, in `LayerRequest`'s own code. The arrays a policy reads (`topk`, `weights`, `probs`,
`lookahead`, `importance`) are sliced from the trace only when it asks, as copies, so no policy can
change the trace that later replays (a sweep's other points) read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from policies import Future, Key, LayerRequest
from traces.columnar import ColumnarTrace
from traces.schema import StepRecord

CHUNK = 4096  # calls whose order is computed in one numpy pass (bounds the memory of an 8M-call trace)


class ColumnarRequest(LayerRequest):
    """A `LayerRequest` whose rows are record `_i` of a columnar trace `_src`, read on demand."""

    __slots__ = ("tokens", "_src", "_i", "_ptrs")

    @property
    def topk(self) -> np.ndarray:
        if self._topk is None:
            a, b = self._src.row_ptr[self._i], self._src.row_ptr[self._i + 1]
            self._topk = self._src.topk[a:b].copy()
        return self._topk  # type: ignore[return-value]

    @property
    def weights(self) -> np.ndarray:
        if self._weights is None:
            a, b = self._src.row_ptr[self._i], self._src.row_ptr[self._i + 1]
            self._weights = self._src.weights[a:b].copy()
        return self._weights  # type: ignore[return-value]

    def _field(self, name: str) -> np.ndarray | None:
        src, i = self._src, self._i
        if not src.has[name][i]:
            return None
        p = self._ptrs[name]
        return getattr(src, name)[p[i]:p[i + 1]].copy()  # type: ignore[no-any-return]

    @property
    def probs(self) -> np.ndarray | None:
        if self._probs is False:
            self._probs = self._field("probs")
        return self._probs  # type: ignore[return-value]

    @property
    def importance(self) -> np.ndarray | None:
        if self._importance is False:
            self._importance = self._field("importance")
        return self._importance  # type: ignore[return-value]

    @property
    def lookahead(self) -> dict[int, np.ndarray] | None:
        if self._lookahead is False:
            la = self._src.lookahead(self._i)
            self._lookahead = None if la is None else {k: v.copy() for k, v in la.items()}
        return self._lookahead  # type: ignore[return-value]

    def _rows(self) -> tuple[list[list[int]], list[list[float]]]:
        return self.topk.tolist(), self.weights.tolist()

    def tokens_per_expert(self) -> dict[int, int]:
        if self._counts is None:
            if self._order is not None and self.tokens == 1:
                self._counts = dict.fromkeys(self._order, 1)
            else:
                self.experts_in_access_order()
        return self._counts  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"LayerRequest(step={self.step}, phase={self.phase!r}, layer={self.layer}, topk={self.topk.tolist()})"


def _one_token_order(topk: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per one-token call (a row), its experts heaviest first (ties: lower id) and its mass, summed
    left to right from 0 as `LayerRequest` does."""
    if topk.shape[1] == 2:
        a, b = topk[:, 0], topk[:, 1]
        wa, wb = weights[:, 0], weights[:, 1]
        keep = (wa > wb) | ((wa == wb) & (a < b))
        order = np.where(keep[:, None], topk, topk[:, ::-1])
    else:
        idx = np.lexsort((topk, -weights), axis=1)
        order = np.take_along_axis(topk, idx, axis=1)
    mass = 0.0 + weights[:, 0]
    for j in range(1, weights.shape[1]):
        mass = mass + weights[:, j]
    return order, mass


def _key_table(col: ColumnarTrace) -> list[Key]:
    m = col.header.model
    return [(layer, e) for layer in range(m.num_moe_layers) for e in range(m.num_experts)]


def _chunk_keys(col: ColumnarTrace, lo: int, hi: int, table: list[Key]) -> tuple[list[list[Key] | None], list[float], list[list[int] | None]]:
    """Keys in access order, mass and expert order of calls lo..hi-1 (None where a call has several rows)."""
    E = col.header.model.num_experts
    tok = col.row_ptr[lo + 1:hi + 1] - col.row_ptr[lo:hi]
    one = tok == 1
    keys: list[list[Key] | None] = [None] * (hi - lo)
    mass: list[float] = [0.0] * (hi - lo)
    orders: list[list[int] | None] = [None] * (hi - lo)
    if one.any():
        idx = np.flatnonzero(one)
        rows = col.row_ptr[lo:hi][idx]
        order, m = _one_token_order(col.topk[rows], col.weights[rows])
        flat = (col.layer[lo:hi][idx] * E)[:, None] + order
        get = table.__getitem__
        ks = [list(map(get, r)) for r in flat.tolist()]
        ol = order.tolist()
        ml = m.tolist()
        for j, i in enumerate(idx.tolist()):
            keys[i] = ks[j]
            mass[i] = ml[j]
            orders[i] = ol[j]
    return keys, mass, orders


def requests(col: ColumnarTrace, with_steps: bool = False) -> Iterator[LayerRequest | StepRecord]:
    """One request per layer record, in order; with `with_steps`, the trace's step records too, in
    their places (what the engine's context tracker reads: `sim.context`)."""
    if with_steps and len(col.step_records.get("pos", ())):
        yield from _with_steps(col)
        return
    table = _key_table(col)
    ptrs = {name: col.ptr(name) for name in ("probs", "importance")}
    new = ColumnarRequest.__new__
    n = col.n
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        keys, mass, orders = _chunk_keys(col, lo, hi, table)
        steps = col.step[lo:hi].tolist()
        layers = col.layer[lo:hi].tolist()
        phases = ["prefill" if p else "decode" for p in col.prefill[lo:hi].tolist()]
        tokens = (col.row_ptr[lo + 1:hi + 1] - col.row_ptr[lo:hi]).tolist()
        for j in range(hi - lo):
            r = new(ColumnarRequest)
            r.step, r.phase, r.layer, r.tokens = steps[j], phases[j], layers[j], tokens[j]
            r._src, r._i, r._ptrs = col, lo + j, ptrs
            r._topk = r._weights = None
            r._probs = r._lookahead = r._importance = False  # not read yet
            ks = keys[j]
            if ks is None:  # several token rows: LayerRequest's own sums, from the rows
                r._order = r._keys = r._counts = None
                r._mass = 0.0
                r._topk, r._weights = r.topk, r.weights
            else:
                r._order, r._keys, r._counts, r._mass = orders[j], ks, None, mass[j]
            yield r


def future(col: ColumnarTrace) -> Future:
    """Every layer call's keys in access order: what oracle policies are given at reset."""
    table = _key_table(col)
    calls: list[list[Key]] = []
    for lo in range(0, col.n, CHUNK):
        hi = min(col.n, lo + CHUNK)
        keys, _, _ = _chunk_keys(col, lo, hi, table)
        for j, ks in enumerate(keys):
            if ks is None:
                i = lo + j
                a, b = col.row_ptr[i], col.row_ptr[i + 1]
                ks = LayerRequest(int(col.step[i]), "decode", int(col.layer[i]), col.topk[a:b], col.weights[a:b]).keys_in_access_order()
            calls.append(ks)
    return Future(calls)


def _with_steps(col: ColumnarTrace) -> Iterator[LayerRequest | StepRecord]:
    pos = col.step_records["pos"].tolist()
    j = 0
    for i, req in enumerate(requests(col)):
        while j < len(pos) and pos[j] <= i:
            yield col.step_record(j)
            j += 1
        yield req
    while j < len(pos):
        yield col.step_record(j)
        j += 1
