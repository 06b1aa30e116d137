"""MoE-Infinity (Xue et al., arXiv 2401.14361): activation-aware prefetching and caching from
sequence-level expert activation traces."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.base import DemandPolicy, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan
from policies.request import Key, LayerRequest


class MoEInfinityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    capacity: int = Field(16, ge=1, le=4096, description="past sequences' activation matrices kept")
    budget: int = Field(2, ge=0, le=1024, description="prefetches issued per layer call at most (0: none)")
    window: int = Field(
        0, ge=0, le=1_000_000,
        description="also start a new sequence every `window` decode steps (for traces without prefill steps); 0: off",
    )


@register("moe-infinity")
class MoEInfinity(DemandPolicy):
    """Prefetch what the most similar past sequence used in later layers; evict by activation
    frequency in the current sequence times a layer decay that favours early layers.

    MoE-Infinity (arXiv 2401.14361) traces, per sequence, an expert activation matrix (EAM: MoE
    layers x experts, the number of token rows routed to each expert) and keeps a bounded collection
    of past sequences' matrices (`capacity`). Exactly, at every layer call (MoE layer l of L, step s):

    1. **Sequences.** A sequence starts at the first layer call of a prefill step that follows a
       decode step (or the first step): consecutive prefill steps are one prompt's chunks. With
       `window` > 0 a new sequence also starts after every `window` decode steps of the current one
       (an extension for decode-only traces such as the imported Mixtral ones, where every step is
       decode and the collection would otherwise stay empty). When a sequence starts, the previous
       one's matrix, if not empty, joins the collection; a full collection drops the stored matrix
       most similar (cosine) to the new one, ties to the oldest, so it keeps distinct patterns.
    2. **Tracing.** The call's counts are added to the current matrix `C` (row l), and `n[l]` (token
       rows seen at layer l in this sequence) grows by the call's tokens.
    3. **Demand.** Every routed expert runs on the GPU; misses are loaded in access order (as for
       every `DemandPolicy`), victims chosen as in 5.
    4. **Prefetch.** The current partial matrix, rows 0..l of `C` flattened, is matched against rows
       0..l of every stored matrix by cosine similarity; the best one `M` (ties: the earliest
       stored; none if no similarity is above 0) scores expert e of each later layer x = l+1..L-1 as
       `M[x, e] * (1 - (x - l) / (L + 1))`. Non-resident experts with a positive score are prefetched
       in decreasing score (ties: nearer layer, lower id), at most `budget` per call, with
       `make_room(after=loads, force=False)`: a prefetch never evicts an expert of the call or
       another prefetch target.
    5. **Eviction.** The victim is the resident key outside the protected set with the lowest
       `(pending, priority)`, ties to the least recently used, where
       `priority(x, e) = C[x, e] / n[x] * (1 - x / (L + 1))` (0 when `n[x]` = 0): the expert's
       activation ratio in the current sequence times a layer decay that keeps early layers' experts
       (prefetching has the least time to hide their loads), and `pending` is 1 for a key prefetched
       in this step for a layer still ahead, so prefetches are not evicted before their use.

    Needs nothing from the trace beyond the routing. Lossless.
    """

    Params = MoEInfinityParams

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.L, self.E = model.num_moe_layers, model.num_experts
        self.cur = np.zeros((self.L, self.E), dtype=np.float64)
        self.tokens = np.zeros(self.L, dtype=np.float64)
        self.collection: list[np.ndarray] = []
        self.sequences = 0  # sequences started
        self._step: int | None = None
        self._prev_phase: str | None = None
        self._decode = 0  # decode steps in the current sequence
        self._layer = 0
        self.pending: dict[Key, int] = {}  # key prefetched in this step -> its target layer
        self._decay = 1.0 - np.arange(self.L, dtype=np.float64) / (self.L + 1)

    # -- sequences ----------------------------------------------------------------------------------
    def _new_sequence(self) -> None:
        if self.cur.any():
            m = self.cur.copy()
            if len(self.collection) < self.params.capacity:  # type: ignore[attr-defined]
                self.collection.append(m)
            else:
                flat = m.ravel()
                sims = [_cosine(flat, c.ravel()) for c in self.collection]
                i = max(range(len(sims)), key=lambda j: (sims[j], -j))
                del self.collection[i]
                self.collection.append(m)
        self.cur = np.zeros((self.L, self.E), dtype=np.float64)
        self.tokens = np.zeros(self.L, dtype=np.float64)
        self.sequences += 1

    def _on_step(self, req: LayerRequest) -> None:
        window = self.params.window  # type: ignore[attr-defined]
        if req.phase == "prefill":
            new = self._prev_phase != "prefill"
            self._decode = 0
        else:
            self._decode += 1
            new = self._prev_phase is None or (window > 0 and self._decode > window)
            if new:
                self._decode = 1
        if new:
            self._new_sequence()
        self._step, self._prev_phase = req.step, req.phase
        self.pending.clear()

    # -- planning -----------------------------------------------------------------------------------
    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        if req.step != self._step:
            self._on_step(req)
        layer = self._layer = req.layer
        for e, n in req.tokens_per_expert().items():
            self.cur[layer, e] += n
        self.tokens[layer] += req.tokens
        plan = super().plan(req, cache)
        budget = self.params.budget  # type: ignore[attr-defined]
        if not budget or not self.collection or layer + 1 >= self.L:
            return plan
        match = self._best_match(layer)
        if match is None:
            return plan
        L = self.L
        later = match[layer + 1 :] * (1.0 - (np.arange(layer + 1, L, dtype=np.float64) - layer) / (L + 1))[:, None]
        resident = cache.resident
        cands = [
            (-float(later[i, e]), layer + 1 + i, e)
            for i, e in zip(*np.nonzero(later > 0), strict=True)
            if (layer + 1 + int(i), int(e)) not in resident
        ]
        if not cands:
            return plan
        cands.sort()
        targets = [(int(x), int(e)) for _, x, e in cands[:budget]]
        pre = self.make_room(cache, targets, set(plan.execute) | set(targets), force=False, after=plan.loads)
        for ld in pre:
            self.pending[ld.key] = ld.key[0]
        plan.prefetch = pre
        return plan

    def _best_match(self, layer: int) -> np.ndarray | None:
        part = self.cur[: layer + 1].ravel()
        best: np.ndarray | None = None
        best_sim = 0.0
        for m in self.collection:
            s = _cosine(part, m[: layer + 1].ravel())
            if s > best_sim:
                best, best_sim = m, s
        return best

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        cur, tokens, decay, pending, layer = self.cur, self.tokens, self._decay, self.pending, self._layer
        best: Key | None = None
        best_rank: tuple[bool, float] | None = None
        for k in cache.least_recent(part):
            if k in exclude:
                continue
            x, e = k
            n = tokens[x]
            rank = (pending.get(k, -1) > layer, float(cur[x, e] / n * decay[x]) if n else 0.0)
            if best_rank is None or rank < best_rank:
                best, best_rank = k, rank
                if rank == (False, 0.0):
                    break  # nothing ranks lower; the least recent such key
        return best


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(np.dot(a, b)) / d if d > 0 else 0.0
