"""What an engine asks a policy at one MoE layer call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Key = tuple[int, int]
"""A cache key: (MoE layer index, expert id)."""


def _heaviest_first(pair: tuple[float, int]) -> tuple[float, int]:
    return (-pair[0], pair[1])


@dataclass(slots=True)
class LayerRequest:
    """One MoE layer call of one forward step, as both engines present it to a policy.

    Arrays are numpy; `weights` are float64 in both engines so that sums, and hence the access
    order, come out the same to the last bit.
    """

    step: int
    phase: Literal["prefill", "decode"]
    layer: int
    topk: np.ndarray  # (tokens, top_k) int
    weights: np.ndarray  # (tokens, top_k) float64
    probs: np.ndarray | None = None  # (tokens, num_experts)
    lookahead: dict[int, np.ndarray] | None = None  # later layer -> (tokens, top_k)
    importance: np.ndarray | None = None  # (tokens,)
    _order: list[int] | None = field(default=None, repr=False)
    _counts: dict[int, int] | None = field(default=None, repr=False)
    _mass: float = field(default=0.0, repr=False)

    @property
    def tokens(self) -> int:
        return int(self.topk.shape[0])

    def experts_in_access_order(self) -> list[int]:
        """Distinct routed experts by decreasing summed routing weight, ties by lower id.

        This order is the definition of recency inside one call (DESIGN section 4): the engines touch
        the experts in it, so LRU-like policies agree to the last expert.
        """
        if self._order is None:
            counts: dict[int, int] = {}
            if self.topk.shape[0] == 1:  # one token (decode): its experts are distinct, no sums needed
                ws = self.weights[0].tolist()
                pairs = sorted(zip(ws, self.topk[0].tolist(), strict=True), key=_heaviest_first)
                self._order = [e for _, e in pairs]
                counts = dict.fromkeys(self._order, 1)
                self._mass = sum(ws)
            else:
                mass: dict[int, float] = {}
                for e, w in zip(self.topk.ravel().tolist(), self.weights.ravel().tolist(), strict=True):
                    mass[e] = mass.get(e, 0.0) + w
                    counts[e] = counts.get(e, 0) + 1
                self._order = sorted(mass, key=lambda e: (-mass[e], e))
                self._mass = sum(self.weights.ravel().tolist())
            self._counts = counts
        return self._order

    def keys_in_access_order(self) -> list[Key]:
        layer = self.layer
        return [(layer, e) for e in self.experts_in_access_order()]

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
