"""What the lossy policies (`mobile`, `substitute`, `buddy`, `hobbit`) share: the plan of an executed
assignment that differs from the router's, a replacement choice, look-ahead prefetch, and the
co-activation statistics that substitution draws on.

A private module (its name starts with '_'): it registers nothing. Every function here reads only
the request, the cache's resident set and bookkeeping, and the policy's own state, never whether a
copy is in flight, so the simulator and the runtime decide alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from policies.base import Policy
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest

Evict = Literal["lru", "lfu"]


def token_shares(weights: np.ndarray) -> np.ndarray:
    """Each routing slot's share of its token's routed weight, so that thresholds mean the same
    whether a model normalises its top-k weights (Mixtral, OLMoE) or not (Qwen2-MoE, DeepSeek's
    scaled sigmoid weights). A row of zero weight gives shares of 0."""
    tot = weights.sum(axis=1, keepdims=True)
    safe = np.where(tot > 0, tot, 1.0)
    return np.where(tot > 0, weights / safe, 0.0)


def access_order(topk: np.ndarray, weights: np.ndarray) -> list[int]:
    """The distinct experts of an executed assignment by decreasing summed weight, ties lower id
    (DESIGN section 4), summed over rows in order in float64 as `LayerRequest` does; -1 slots (dropped)
    are skipped."""
    mass: dict[int, float] = {}
    for ids, ws in zip(topk.tolist(), weights.tolist(), strict=True):
        for e, w in zip(ids, ws, strict=True):
            if e >= 0:
                mass[e] = mass.get(e, 0.0) + w
    return sorted(mass, key=lambda e: (-mass[e], e))


def victim(evict: Evict, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
    """`lru`: the least recently used key; `lfu`: the key with the fewest uses since the start (the
    cache's `uses`: the experts most often reused stay), ties least recent."""
    if evict == "lru":
        for k in cache.least_recent(part):
            if k not in exclude:
                return k
        return None
    return cache.lowest(part, exclude, cache.uses)


def plan_assignment(
    policy: Policy,
    req: LayerRequest,
    cache: ExpertCache,
    topk: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    dropped: float = 0.0,
    substituted: float = 0.0,
) -> LayerPlan:
    """The plan that runs `topk`/`weights` (None: as routed) on the GPU: its distinct experts in access
    order; the hits first, then the misses, each loaded on demand (`make_room`: the policy's victims,
    never an expert of this call). With the routed assignment this is exactly `DemandPolicy.plan`."""
    if topk is None:
        need = req.keys_in_access_order()
    else:
        layer = req.layer
        need = [(layer, e) for e in access_order(topk, weights)]  # type: ignore[arg-type]
    resident = cache.resident
    misses = [k for k in need if k not in resident]
    if not misses:
        return LayerPlan(execute=need, order=need, topk=topk, weights=weights, dropped_mass=dropped, substituted_mass=substituted)
    hits = [k for k in need if k in resident]
    loads = policy.make_room(cache, misses, set(need), hits)
    return LayerPlan(execute=need, order=hits + misses, loads=loads, topk=topk, weights=weights,
                     dropped_mass=dropped, substituted_mass=substituted)


def prefetch_next(
    policy: Policy,
    req: LayerRequest,
    cache: ExpertCache,
    plan: LayerPlan,
    budget: int,
    columns: int | None = None,
) -> list[Key]:
    """Prefetch, for the next MoE layer, the experts the request's look-ahead predicts there (the first
    `columns` of each predicted row when given: routers list their top-k by decreasing probability),
    most predicted first (ties: first predicted), those not resident, up to `budget`. Victims never
    come from this call's experts, the other predicted experts, or the plan's own loads. Sets
    `plan.prefetch` and returns the predicted keys (resident or not)."""
    look = req.lookahead
    nxt = req.layer + 1
    if look is None or nxt not in look:
        return []
    rows = look[nxt]
    if columns is not None:
        rows = rows[:, :columns]
    count: dict[int, int] = {}
    for e in rows.ravel().tolist():
        count[e] = count.get(e, 0) + 1
    ranked = sorted(count, key=lambda e: -count[e])  # stable: first predicted first among equals
    predicted = [(nxt, e) for e in ranked]
    if budget > 0:
        resident = cache.resident
        want = [k for k in predicted if k not in resident][:budget]
        if want:
            protect = set(plan.execute) | {k for k in predicted if k in resident}
            plan.prefetch = policy.make_room(cache, want, protect, force=False, after=plan.loads)
    return predicted


class CoActivation:
    """Per MoE layer, what the policy has seen of the routing so far: `counts[l][e, f]`, the token
    rows routed to both e and f (the diagonal: rows routed to e), and, where the requests carry the
    router's probabilities, `profile[l][e]`, the summed probability vectors of the rows routed to e.

    Accumulated from the router's choice (never the executed one), in request order, so both
    engines hold the same numbers."""

    def __init__(self, num_layers: int, num_experts: int, probs: bool = False):
        self.counts = np.zeros((num_layers, num_experts, num_experts))
        self.profile = np.zeros((num_layers, num_experts, num_experts)) if probs else None

    def add(self, req: LayerRequest) -> None:
        topk = req.topk
        np.add.at(self.counts[req.layer], (topk[:, :, None], topk[:, None, :]), 1.0)
        if self.profile is not None and req.probs is not None:
            np.add.at(self.profile[req.layer], topk, req.probs[:, None, :])

    def cosine(self, layer: int, e: int, use_profile: bool = False) -> np.ndarray:
        """Cosine similarity of expert e's row with every expert's row (0 where a row is all zero)."""
        m = self.profile[layer] if use_profile and self.profile is not None else self.counts[layer]
        norms = np.sqrt((m * m).sum(axis=1))
        dots = m @ m[e]
        den = norms * norms[e]
        return np.where(den > 0, dots / np.where(den > 0, den, 1.0), 0.0)

    def coactivated(self, layer: int, e: int) -> np.ndarray:
        """How often each expert was routed together with e (e itself scores 0)."""
        row = self.counts[layer][e].copy()
        row[e] = 0.0
        return row


def substitute_slots(
    req: LayerRequest,
    cache: ExpertCache,
    eligible: Callable[[int, int], bool],
    score: Callable[[int], np.ndarray],
    min_score: float,
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Replace missing experts by resident ones of the same layer.

    A routing slot (token t, expert e) is a candidate when e is not resident and `eligible(t, j)`;
    an expert with any non-candidate missing slot is loaded anyway, so its candidate slots keep it.
    Each remaining candidate slot gets the resident expert of the layer with the highest
    `score(e)[f]` above `min_score` (ties: lower id) among those the token does not already run;
    an expert one of whose slots finds none is loaded too (and all its slots keep it). Returns the
    executed topk and weights (None when nothing changed) and the substituted routing weight."""
    topk, weights = req.topk, req.weights
    layer = req.layer
    resident = cache.resident
    rows = topk.tolist()
    missing = {e for row in rows for e in row if (layer, e) not in resident}
    if not missing:
        return None, None, 0.0
    loaded: set[int] = set()
    cand: list[tuple[int, int, int]] = []
    for t, row in enumerate(rows):
        for j, e in enumerate(row):
            if e in missing:
                if eligible(t, j):
                    cand.append((t, j, e))
                else:
                    loaded.add(e)
    cand = [c for c in cand if c[2] not in loaded]
    if not cand:
        return None, None, 0.0
    pool = sorted(k[1] for k in resident if k[0] == layer)
    if not pool:
        return None, None, 0.0
    scores: dict[int, np.ndarray] = {}
    running = [set(row) for row in rows]
    choice: dict[tuple[int, int], int] = {}
    for t, j, e in cand:
        if e in loaded:
            continue
        s = scores.get(e)
        if s is None:
            s = scores[e] = score(e)
        best, best_s = -1, min_score
        for f in pool:
            if f not in running[t] and s[f] > best_s:
                best, best_s = f, float(s[f])
        if best < 0:
            loaded.add(e)
        else:
            choice[(t, j)] = best
            running[t].add(best)
    choice = {tj: f for tj, f in choice.items() if rows[tj[0]][tj[1]] not in loaded}
    if not choice:
        return None, None, 0.0
    new = topk.copy()
    mass = 0.0
    for (t, j), f in sorted(choice.items()):
        new[t, j] = f
        mass += float(weights[t, j])
    return new, weights, mass

