"""Synthetic traces with known statistics, for analytical checks of the simulator and policies.

Each generator yields (layer, topk rows, weight rows) per layer call; `write_trace` turns the calls
into a valid trace, one decode step per pass over the layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from traces.io import TraceWriter
from traces.schema import Header, LayerRecord, ModelSpec, Recording, StepRecord

Call = tuple[int, list[list[int]], list[list[float]]]


def toy_model(num_layers: int = 1, num_experts: int = 8, top_k: int = 1, expert_bytes: int = 1_000_000, name: str = "toy") -> ModelSpec:
    return ModelSpec(
        name=name, arch="mixtral", num_layers=num_layers, moe_layers=list(range(num_layers)), num_experts=num_experts,
        top_k=top_k, hidden_size=64, moe_intermediate_size=128, dtype="bf16", expert_bytes=expert_bytes, dense_bytes=0,
    )


def write_trace(path: str | os.PathLike[str], model: ModelSpec, calls: Iterable[Call], source: str = "synthetic") -> int:
    """Write calls as a trace; a new step starts whenever the layer index does not increase.

    Returns the number of layer records.
    """
    header = Header(model=model, recording=Recording(prompt_source=source))
    step, prev_layer, n = 0, None, 0
    with TraceWriter(path, header) as w:
        for layer, topk, weights in calls:
            if prev_layer is not None and layer <= prev_layer:
                w.write(StepRecord(step=step, phase="decode", seq_ids=[0]))
                step += 1
            w.write(LayerRecord(step=step, phase="decode", layer=layer, tokens=len(topk), topk=topk, weights=weights))
            prev_layer = layer
            n += 1
        if n:
            w.write(StepRecord(step=step, phase="decode", seq_ids=[0]))
    return n


def _weights(k: int) -> list[float]:
    # strictly decreasing so that the access order inside a call is the routing order
    w = [float(k - i) for i in range(k)]
    s = sum(w)
    return [x / s for x in w]


def iid_calls(probs: Sequence[float], n_calls: int, num_layers: int = 1, top_k: int = 1, seed: int = 0) -> Iterator[Call]:
    """Independent reference model: each call draws top_k distinct experts with probabilities `probs`."""
    rng = np.random.default_rng(seed)
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()
    w = _weights(top_k)
    for i in range(n_calls):
        ids = rng.choice(len(p), size=top_k, replace=False, p=p).tolist()
        yield i % num_layers, [ids], [w]


def zipf_probs(n: int, alpha: float) -> list[float]:
    r = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return (r / r.sum()).tolist()


def cyclic_calls(n_experts: int, n_calls: int) -> Iterator[Call]:
    """A cyclic scan 0, 1, ..., n-1, 0, 1, ... on one layer, one expert per call."""
    for i in range(n_calls):
        yield 0, [[i % n_experts]], [[1.0]]
