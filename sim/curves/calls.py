"""A trace as the engines see it, call by call: every layer call's distinct experts in access order,
as flat numpy arrays (what the hit-rate curves of `sim.curves` are computed over)."""


from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies import LayerRequest
from traces.io import TraceReader
from traces.schema import LayerRecord, ModelSpec


# -- the trace as layer calls -----------------------------------------------------------------------
@dataclass
class Calls:
    """Every layer call of a trace as the engines see it: its layer and its distinct experts in access
    order (`LayerRequest.experts_in_access_order`). Keys are `layer * num_experts + expert`.

    `keys[starts[i]:starts[i + 1]]` are call i's keys; `layers[i]` its MoE layer; `steps[i]` its step.
    """

    model: ModelSpec
    keys: np.ndarray  # int64, all calls' keys concatenated in trace order
    starts: np.ndarray  # int64, n_calls + 1 offsets into keys
    layers: np.ndarray  # int64, per call
    steps: np.ndarray  # int64, per call
    truncated: bool = False

    @property
    def n_calls(self) -> int:
        return len(self.layers)

    @property
    def accesses(self) -> int:
        return len(self.keys)

    def call_sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def key_tuples(self) -> list[list[tuple[int, int]]]:
        """Per call its keys as the policies name them, `(layer, expert)`, in access order."""
        e = self.model.num_experts
        flat = [(k // e, k % e) for k in self.keys.tolist()]
        b = self.starts.tolist()
        return [flat[b[i] : b[i + 1]] for i in range(len(b) - 1)]


class _CallBuilder:
    """Turns layer records into `Calls`, a chunk at a time: one-token records (decode) are ordered with
    one numpy sort per chunk, records of several tokens through `LayerRequest` itself."""

    CHUNK = 1 << 16

    def __init__(self, model: ModelSpec):
        self.model = model
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # keys, sizes, layers, steps
        self._reset()

    def _reset(self) -> None:
        self.layers: list[int] = []
        self.steps: list[int] = []
        self.sizes: list[int] = []
        self.one_ids: list[list[int]] = []  # one-token records: their row, weights, index in the chunk
        self.one_w: list[list[float]] = []
        self.one_at: list[int] = []
        self.many: dict[int, list[int]] = {}  # index in the chunk -> experts in access order

    def add(self, rec: LayerRecord) -> None:
        i = len(self.layers)
        self.layers.append(rec.layer)
        self.steps.append(rec.step)
        row = rec.topk[0]
        if rec.tokens == 1 and len(row) == self.model.top_k:
            self.one_ids.append(row)
            self.one_w.append(rec.weights[0])
            self.one_at.append(i)
            self.sizes.append(len(row))
        else:
            order = LayerRequest(rec.step, rec.phase, rec.layer, rec.topk, rec.weights).experts_in_access_order()
            self.many[i] = order
            self.sizes.append(len(order))
        if i + 1 >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.layers:
            return
        e = self.model.num_experts
        layers = np.asarray(self.layers, dtype=np.int64)
        sizes = np.asarray(self.sizes, dtype=np.int64)
        offs = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offs[1:])
        experts = np.empty(int(offs[-1]), dtype=np.int64)
        if self.one_ids:
            ids = np.asarray(self.one_ids, dtype=np.int64)  # rows of top_k distinct ids (the reader checks)
            w = np.asarray(self.one_w, dtype=np.float64)
            # by decreasing weight, ties by lower id: LayerRequest's one-token order, on the same float64s
            order = np.lexsort((ids, -w), axis=-1)
            ranked = np.take_along_axis(ids, order, axis=-1)
            at = offs[np.asarray(self.one_at, dtype=np.int64)]
            experts[(at[:, None] + np.arange(ids.shape[1])).ravel()] = ranked.ravel()
        for i, order_list in self.many.items():
            experts[offs[i] : offs[i + 1]] = order_list
        keys = np.repeat(layers * e, sizes) + experts
        self.parts.append((keys, sizes, layers, np.asarray(self.steps, dtype=np.int64)))
        self._reset()

    def build(self, truncated: bool) -> Calls:
        self.flush()
        if self.parts:
            keys, sizes, layers, steps = (np.concatenate(x) for x in zip(*self.parts, strict=True))
        else:
            keys, sizes, layers, steps = (np.zeros(0, dtype=np.int64) for _ in range(4))
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        return Calls(self.model, keys, starts, layers, steps, truncated)


def calls_from_records(model: ModelSpec, records: Iterable[Any], truncated: bool = False) -> Calls:
    b = _CallBuilder(model)
    for rec in records:
        if isinstance(rec, LayerRecord):
            b.add(rec)
    return b.build(truncated)


def read_calls(path: str | os.PathLike[str], allow_truncated: bool = False) -> Calls:
    """Read (streaming, validating) a trace into `Calls`. Raises `TraceError` on a bad trace."""
    reader = TraceReader(path, allow_truncated=allow_truncated)
    b = _CallBuilder(reader.header.model)
    for rec in reader:
        if isinstance(rec, LayerRecord):
            b.add(rec)
    return b.build(reader.truncated)
