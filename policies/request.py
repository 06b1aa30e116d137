"""What an engine asks a policy at one MoE layer call."""

from __future__ import annotations

from typing import Literal

import numpy as np

Key = tuple[int, int]
"""A cache key: (MoE layer index, expert id)."""

Rows = list[list[int]] | list[list[float]]


def _heaviest_first(pair: tuple[float, int]) -> tuple[float, int]:
    return (-pair[0], pair[1])


class LayerRequest:
    """One MoE layer call of one forward step, as both engines present it to a policy.

    `topk`, `weights`, `probs`, `lookahead` and `importance` are numpy arrays (int64 ids, float64
    weights in both engines, so that sums and hence the access order agree to the last bit). An
    engine may hand over nested lists instead (the simulator does, straight from the trace); they
    become arrays the first time a policy asks, so a policy that needs only the access order never
    pays for the conversion.
    """

    __slots__ = (
        "step", "phase", "layer", "_topk", "_weights", "_probs", "_lookahead", "_importance",
        "_order", "_counts", "_mass", "_keys",
    )

    def __init__(
        self,
        step: int,
        phase: Literal["prefill", "decode"],
        layer: int,
        topk: np.ndarray | list[list[int]],
        weights: np.ndarray | list[list[float]],
        probs: np.ndarray | list[list[float]] | None = None,
        lookahead: dict[int, np.ndarray] | dict[int, list[list[int]]] | None = None,
        importance: np.ndarray | list[float] | None = None,
    ):
        self.step, self.phase, self.layer = step, phase, layer
        self._topk, self._weights, self._probs = topk, weights, probs
        self._lookahead, self._importance = lookahead, importance
        self._order: list[int] | None = None
        self._counts: dict[int, int] | None = None
        self._mass = 0.0
        self._keys: list[Key] | None = None

    # -- the arrays ---------------------------------------------------------------------------------
    @property
    def topk(self) -> np.ndarray:
        """(tokens, top_k) expert ids as the router chose them."""
        if not isinstance(self._topk, np.ndarray):
            self._topk = np.array(self._topk, dtype=np.int64)
        return self._topk

    @property
    def weights(self) -> np.ndarray:
        """(tokens, top_k) routing weights, float64."""
        if not isinstance(self._weights, np.ndarray):
            self._weights = np.array(self._weights, dtype=np.float64)
        return self._weights

    @property
    def probs(self) -> np.ndarray | None:
        """(tokens, num_experts) router probabilities, where the trace has them."""
        if self._probs is not None and not isinstance(self._probs, np.ndarray):
            self._probs = np.array(self._probs, dtype=np.float64)
        return self._probs

    @property
    def lookahead(self) -> dict[int, np.ndarray] | None:
        """Later MoE layer -> (tokens, top_k) experts its router predicts from this layer's input."""
        la = self._lookahead
        if la is not None and any(not isinstance(v, np.ndarray) for v in la.values()):
            self._lookahead = la = {int(k): np.array(v, dtype=np.int64) for k, v in la.items()}
        return la  # type: ignore[return-value]

    @property
    def importance(self) -> np.ndarray | None:
        """(tokens,) token-importance scores, where the trace has them."""
        if self._importance is not None and not isinstance(self._importance, np.ndarray):
            self._importance = np.array(self._importance, dtype=np.float64)
        return self._importance

    @property
    def tokens(self) -> int:
        return len(self._topk)

    def _rows(self) -> tuple[list[list[int]], list[list[float]]]:
        t, w = self._topk, self._weights
        return (t.tolist() if isinstance(t, np.ndarray) else t, w.tolist() if isinstance(w, np.ndarray) else w)

    # -- the access order ---------------------------------------------------------------------------
    def experts_in_access_order(self) -> list[int]:
        """Distinct routed experts by decreasing summed routing weight, ties by lower id.

        This order is the definition of recency inside one call (DESIGN section 4): the engines touch
        the experts in it, so LRU-like policies agree to the last expert. Sums run over token rows in
        order, in float64, the same in both engines.
        """
        if self._order is None:
            rows, wrows = self._rows()
            if len(rows) == 1:  # one token (decode): its experts are distinct, no sums needed
                ids, ws = rows[0], [float(w) for w in wrows[0]]
                if len(ids) == 2:
                    a, b = ids
                    wa, wb = ws
                    self._order = [a, b] if wa > wb or (wa == wb and a < b) else [b, a]
                else:
                    self._order = [e for _, e in sorted(zip(ws, ids, strict=True), key=_heaviest_first)]
                self._counts = dict.fromkeys(self._order, 1)
                self._mass = sum(ws)
            else:
                mass: dict[int, float] = {}
                counts: dict[int, int] = {}
                total = 0.0
                for ids, ws in zip(rows, wrows, strict=True):
                    for e, w in zip(ids, ws, strict=True):
                        mass[e] = mass.get(e, 0.0) + w
                        counts[e] = counts.get(e, 0) + 1
                        total += w
                self._order = sorted(mass, key=lambda e: (-mass[e], e))
                self._counts = counts
                self._mass = total
        return self._order

    def keys_in_access_order(self) -> list[Key]:
        """The same order as cache keys; the list is shared, do not change it."""
        if self._keys is None:
            layer = self.layer
            self._keys = [(layer, e) for e in self.experts_in_access_order()]
        return self._keys

    def tokens_per_expert(self) -> dict[int, int]:
        """How many token rows each routed expert serves in this call (its compute batch)."""
        if self._counts is None:
            self.experts_in_access_order()
        assert self._counts is not None
        return self._counts

    @property
    def total_mass(self) -> float:
        """Summed routing weight of the call (the denominator of dropped and substituted mass)."""
        if self._order is None:
            self.experts_in_access_order()
        return self._mass

    def __repr__(self) -> str:
        return f"LayerRequest(step={self.step}, phase={self.phase!r}, layer={self.layer}, topk={self._rows()[0]})"
