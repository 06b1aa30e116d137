"""MoBiLE: big and little experts per token (Zhao et al., "MoBiLE: Efficient Mixture-of-Experts
Inference on Consumer GPU with Mixture of Big Little Experts", arXiv 2510.12357)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies import _lossy
from policies.base import Policy, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest


class MobileParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(0.2, ge=0.0, le=1.0, description="a token whose score is below it runs its little set; 0: every token runs the big set")
    metric: Literal["confidence", "entropy", "importance"] = Field("confidence", description="the token score compared with threshold")
    prefetch: int = Field(0, ge=0, le=1024, description="per layer call: little experts of the next layer prefetched from the look-ahead")
    evict: Literal["lru", "lfu"] = Field("lru", description="replacement: least recently or least frequently used")


@register("mobile")
class Mobile(Policy):
    """A token judged unimportant runs its little set, the top max(1, k/2) experts of its own routing
    (weights renormalised to the token's routed mass); an important token runs its full top-k (big).

    Why: most of a token's routing mass sits in its first experts, so for tokens where the rest
    matters little, half the experts (hence fewer misses, fewer copies) cost little quality; the
    paper reports 1.60-1.72x over its baseline.

    Importance: a token is unimportant when its score is below `threshold`, so `threshold=0` makes
    every token important (exactly the base replacement policy) and a higher threshold trades more
    quality for speed. Scores, each in [0, 1]:

    - `confidence` (default): the share of the token's routed weight outside its little set. The
      issue's "little-set mass >= threshold means unimportant" written so that 0 means all big: the
      little set runs alone when it holds more than 1 - threshold of the token's weight.
    - `entropy`: the router's normalised entropy H(p) / log(num_experts) over its probabilities
      (`probs`; sigmoid scores are normalised first). A decided router (low entropy) puts its mass
      on the first experts, so the little set suffices; an undecided one keeps the big set.
    - `importance`: the trace's per-token `importance` as given (our recorder writes 1 - normalised
      entropy, the mirror image of `entropy`: there a decided router keeps the big set).

    Fallback: every executed expert that is missing, little or big, is loaded at once (urgent);
    victims by `evict`. Prefetch: with `prefetch=n`, and where the request carries `lookahead`,
    up to n little experts (the first max(1, k/2) columns of each predicted row) of the next layer
    that are not resident are prefetched, most predicted first. Without `lookahead` nothing is
    prefetched (the look-ahead is optional).
    """

    Params = MobileParams
    lossless = False

    def __init__(self, params: BaseModel | None = None, **kwargs: object):
        super().__init__(params, **kwargs)
        p: MobileParams = self.params  # type: ignore[assignment]
        uses = set()
        if p.metric == "entropy":
            uses.add("probs")
        elif p.metric == "importance":
            uses.add("importance")
        if p.prefetch > 0:
            uses.add("lookahead")
            self.lookahead_depth = 1
        self.uses = frozenset(uses)  # type: ignore[misc]

    def required_fields(self) -> set[str]:
        return set(self.uses) - {"lookahead"}

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return _lossy.victim(self.params.evict, cache, part, exclude)  # type: ignore[attr-defined]

    def scores(self, req: LayerRequest) -> np.ndarray:
        """Each token's score (in [0, 1]); the token runs its little set when below `threshold`."""
        p: MobileParams = self.params  # type: ignore[assignment]
        if p.metric == "confidence":
            shares = _lossy.token_shares(req.weights)
            little = little_slots(req.topk, req.weights)
            return np.where(little, 0.0, shares).sum(axis=1)
        if p.metric == "entropy":
            probs = req.probs
            if probs is None:
                raise PolicySpecError("mobile(metric=entropy) needs the router's probabilities (trace field probs)")
            q = probs / probs.sum(axis=1, keepdims=True)
            logs = np.log(np.where(q > 0, q, 1.0))
            return -(q * logs).sum(axis=1) / math.log(probs.shape[1])
        imp = req.importance
        if imp is None:
            raise PolicySpecError("mobile(metric=importance) needs the trace field importance")
        return imp

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        p: MobileParams = self.params  # type: ignore[assignment]
        topk = weights = None
        dropped = 0.0
        if p.threshold > 0:
            small = self.scores(req) < p.threshold
            if small.any():
                topk, weights, dropped = little_assignment(req.topk, req.weights, small)
        plan = _lossy.plan_assignment(self, req, cache, topk, weights, dropped=dropped)
        if p.prefetch > 0:
            k = req.topk.shape[1]
            _lossy.prefetch_next(self, req, cache, plan, p.prefetch, columns=max(1, k // 2))
        return plan


def little_slots(topk: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(tokens, k) mask of each token's little set: its max(1, k // 2) heaviest slots, ties lower id."""
    n, k = topk.shape
    keep = max(1, k // 2)
    mask = np.zeros((n, k), dtype=bool)
    ids, ws = topk.tolist(), weights.tolist()
    for t in range(n):
        order = sorted(range(k), key=lambda j: (-ws[t][j], ids[t][j]))
        mask[t, order[:keep]] = True
    return mask


def little_assignment(topk: np.ndarray, weights: np.ndarray, small: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The executed assignment: rows in `small` keep their little set (weights scaled up to the row's
    routed mass), their other slots dropped (-1, weight 0). Returns it and the dropped weight."""
    little = little_slots(topk, weights)
    drop = small[:, None] & ~little
    new_t = np.where(drop, -1, topk)
    new_w = np.where(drop, 0.0, weights)
    dropped = float(weights[drop].sum())
    tot = weights.sum(axis=1)
    kept = new_w.sum(axis=1)
    scale = np.where(small & (kept > 0), tot / np.where(kept > 0, kept, 1.0), 1.0)
    return new_t, new_w * scale[:, None], dropped
