"""Hit-rate curves over every cache size at once: LRU, Belady (OPT) and the compulsory-miss bound.

    python -m sim.curves TRACE [--partition global|per_layer] [--max-slots N] [--out curves.json]
        [--html curves.html] [--allow-truncated] [--stack-only]

The curves count exactly what `sim.replay` counts for the policies `lru` and `belady` (`hits` over
`accesses`, DESIGN section 5), with the simulator's call semantics (DESIGN section 4): a layer call's
distinct experts, in access order, must all be resident at once; a victim is never an expert of the
same call; after the call its experts are the most recent, the first touched the least recent of them.

Why one pass is enough. Let T be the largest number of distinct experts in one layer call. For a
cache of C >= T slots (per partition), the cache after a call with need set N is
`N + best(C - |N|, cache - N)`, where `best(m, X)` keeps the m members of X that the policy ranks
highest: by recency for LRU; for Belady by next use (sooner first), ties by recency (the replay's
Belady evicts the farthest next use, ties to the least recent). The ranking does not depend on C, and
the caches of C and C + 1 slots differ by at most one key, so by induction the cache of C slots is
contained in the cache of C + 1 slots at every call (inclusion). The caches are then the prefixes of
one stack, and a key of a call hits in a cache of C slots iff its depth in the stack before the call
(0-based, counting every key above it, the call's other keys included) is below C.

- LRU: the stack is the recency order, so the depth of a key is the number of distinct keys touched
  after its previous access and before the call. It is computed for all accesses at once, offline,
  as a dominance count (`count_less`, a wavelet matrix over the accesses' previous-access positions:
  O(n log n) with numpy, no Python loop per access).
- OPT: Mattson's priority stack with Belady's priority (next use, then recency), updated per call:
  the call's keys go to the top, and walking the old stack down, each level takes the best of the
  keys displaced so far (`_opt_depths_walk`, a Python step per level). `opt_depths` computes the same
  stack level by level instead: along one level the key it holds is a running maximum of what the
  level above pushes out, restarted where a call needs it, so each level is a few numpy passes over
  the calls that reach it (the walk's work, without a Python step per level and call).

Sizes below T: a call that needs more experts than the partition has slots streams them through the
slots (`DemandPolicy.make_room`'s forced path), inclusion breaks there, and those sizes (from top_k,
the smallest cache `sim.replay` accepts, to T - 1) are computed by running the `lru` and `belady`
policies themselves once per size (`--stack-only` leaves them out). Each row of the output says how
it was computed (`method`: `stack` or `simulated`).

`per_layer`: one stack per MoE layer, and the size is slots per layer (`--cache-per-layer K`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lab.cache import CacheConfig
from policies import CacheError, Counters, LayerRequest, PolicySpecError, apply_plan, make_policy
from policies.base import Future
from traces.cli import OneLineParser
from traces.io import TraceError, TraceReader, file_digest, write_text_atomic
from traces.schema import LayerRecord, ModelSpec

TOOL = "moe-offload-lab 0.1.0"
Partition = Literal["global", "per_layer"]
NEVER = np.iinfo(np.int64).max  # the depth of a first access: a miss at every size


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


# -- LRU: stack depths by a dominance count -----------------------------------------------------------
def count_less(values: np.ndarray, ends: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For every query q: how many i < ends[q] have values[i] < bounds[q] (values, bounds >= 0).

    A wavelet matrix over `values`: one level per bit, each a stable partition by that bit and a
    prefix count of its zeros; all queries descend together, so the cost is O((n + q) log max)
    in numpy operations, none per element in Python.
    """
    n = len(values)
    out = np.zeros(len(ends), dtype=np.int64)
    if n == 0 or len(ends) == 0:
        return out
    top = int(max(int(values.max()), int(bounds.max())))
    dt = np.int32 if max(top, n) < 2**31 - 1 else np.int64
    cur = values.astype(dt)
    lo = np.zeros(len(ends), dtype=dt)
    hi = ends.astype(dt)
    bounds = bounds.astype(dt)
    zeros = np.zeros(n + 1, dtype=dt)
    for b in range(top.bit_length() - 1, -1, -1):
        bit = ((cur >> b) & 1).astype(bool)
        np.cumsum(~bit, out=zeros[1:])
        nz = zeros[-1]
        qb = ((bounds >> b) & 1).astype(bool)
        lo0, hi0 = zeros[lo], zeros[hi]
        out += np.where(qb, hi0 - lo0, 0)  # bound's bit is 1: every value with a 0 here is smaller
        lo = np.where(qb, nz + (lo - lo0), lo0)
        hi = np.where(qb, nz + (hi - hi0), hi0)
        cur = np.concatenate((cur[~bit], cur[bit]))
    return out


def _partition_order(calls: Calls, partition: Partition) -> tuple[np.ndarray, np.ndarray]:
    """The accesses in the order one partition sees them (its stacks laid end to end), and for each
    the position of its call's first access in that order."""
    n = calls.accesses
    sizes = calls.call_sizes()
    first = np.repeat(calls.starts[:-1], sizes)  # each access's call start, in trace order
    if partition == "global":
        return np.arange(n, dtype=np.int64), first
    perm = np.argsort(np.repeat(calls.layers, sizes), kind="stable")
    # a call's accesses stay together and in order, so its start moves with its first access
    return perm, np.arange(n, dtype=np.int64) - (perm - first[perm])


def _previous(keys: np.ndarray) -> np.ndarray:
    """For every position, the previous position holding the same key, or -1."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    same = ks[1:] == ks[:-1]
    prev = np.full(len(keys), -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    return prev


def lru_depths(calls: Calls, partition: Partition = "global") -> np.ndarray:
    """Per access (trace order): its 0-based LRU stack depth before its call, `NEVER` for a first access.

    The depth of an access at position t of key k, whose previous access is at p and whose call starts
    at s, is the number of distinct keys accessed in (p, s): the positions j in (p, s) that are the
    first of their key there, i.e. with prev[j] < p. As every j <= p has prev[j] < p, that is
    count(j < s, prev[j] < p) - (p + 1), one dominance count for all accesses at once.
    """
    perm, start = _partition_order(calls, partition)
    keys = calls.keys[perm]
    prev = _previous(keys)
    depth = np.full(len(keys), NEVER, dtype=np.int64)
    q = np.flatnonzero(prev >= 0)
    p = prev[q]
    depth[q] = count_less(prev + 1, start[q], p + 1) - (p + 1)
    out = np.empty_like(depth)
    out[perm] = depth
    return out


# -- OPT: Mattson's priority stack with Belady's priority --------------------------------------------
def _sortable(a: np.ndarray) -> np.ndarray:
    """`a` (non-negative ints) in the narrowest type numpy's stable sort takes by radix (16 bits), else as is."""
    return a.astype(np.int16) if len(a) and int(a.max()) < 2**15 else a


def _next_access(keys: np.ndarray) -> np.ndarray:
    """For every position, the next position holding the same key, or -1."""
    order = np.argsort(_sortable(keys), kind="stable")
    ks = keys[order]
    same = ks[1:] == ks[:-1]
    nxt = np.full(len(keys), -1, dtype=np.int64)
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def _next_use(calls: Calls) -> np.ndarray:
    """Per access: the index of the next call that uses its key, or n_calls if none does."""
    nxt = _next_access(calls.keys)
    call_of = np.repeat(np.arange(calls.n_calls, dtype=np.int64), calls.call_sizes())
    return np.where(nxt >= 0, call_of[nxt], calls.n_calls)


def opt_depths(calls: Calls, partition: Partition = "global") -> np.ndarray:
    """Per access (trace order): its 0-based depth in the Belady priority stack before its call
    (a hit in a cache of C >= T slots iff depth < C), `NEVER` for a first access.

    The stack is the one `_opt_depths_walk` keeps (the same depths, every one), computed level by
    level instead of call by call, each level one pass of numpy operations over the calls.

    The walk's update, restated: a key's keep-priority after its access is (sooner next use, then more
    recent); for a call with need set N (|N| = m), N goes to the top levels 0..m-1, and below, walking
    down from level 0 with a carry D (what the levels above pushed out), each level gets the best of D
    and its old key, and D keeps the rest; a key of N, or an empty level below the stack, counts as
    nothing (it leaves a hole, which the best of D fills). With D padded by holes to exactly m entries,
    a level >= m takes max(old, max D) and passes on D + {old} - max, and a level < m takes N's key and
    passes on D + {old}: D is then the keys the cache of that many slots evicts in the call.

    Seen along one level (all calls at once): its key after call t is max(z_t, max D_t), where z_t is
    its key after call t - 1, or a hole if the call needs that key (the call finds it at this depth).
    So the level holds a running maximum of the carries that restarts where its key is needed, and the
    key it holds is the one needed soonest of those since the last restart: the restarts are the
    chain r -> min(next use of the carries at r and after), one suffix minimum (with one partition,
    the next use of the best carry at r and after: a better rank is never needed later). Per level:
    that suffix scan, the chain (a Python step per access found at this depth), the running maximum
    with an offset per restart (`maximum.accumulate`), and the new carries (`minimum`/`maximum`, one
    pass per column; the columns past the usual call size are kept for the few wider calls only). A
    call takes part in a level while its carry holds a key (the levels down to its deepest key), so
    the work is the walk's, in numpy passes instead of Python steps, and the calls whose carries have
    emptied are dropped every few levels. Priorities are ranks 1..n (0 is a hole).
    """
    n = calls.accesses
    depth = np.full(n, NEVER, dtype=np.int64)
    if n == 0:
        return depth
    nc = calls.n_calls
    sizes = calls.call_sizes()
    nxt = _next_access(calls.keys)
    call_of = np.repeat(np.arange(nc + 1, dtype=np.int64), np.append(sizes, 1))  # ... and nc for "none"
    nu = call_of[nxt]  # per access: the next call using its key, nc if none (nxt -1: the last entry)
    INF = nc + 1  # the time of "never"
    # the partition's calls laid end to end; "time" is a call's place in that order
    parted = partition == "per_layer"
    when = np.empty(nc + 1, dtype=np.int64)
    if parted:
        ordc = np.argsort(_sortable(calls.layers), kind="stable")
        part = calls.layers[ordc]
        when[ordc] = np.arange(nc, dtype=np.int64)
        msz = sizes[ordc]
        first = calls.starts[:-1][ordc]
    else:
        part = np.zeros(nc, dtype=np.int64)
        when[:nc] = np.arange(nc, dtype=np.int64)
        msz = sizes
        first = calls.starts[:-1]
    when[nc] = INF
    # priority ranks: a later next use first, then an older access (the walk's packed priority order)
    rank = np.argsort(_sortable(nc - nu), kind="stable")
    val = np.empty(n, dtype=np.int64)
    val[rank] = np.arange(1, n + 1, dtype=np.int64)
    due = np.empty(n + 1, dtype=np.int64)  # per rank: the time of its key's next use (INF for a hole)
    due[0] = INF
    due[1:] = when[nu[rank]]
    finds = np.empty(n + 1, dtype=np.int64)  # per rank: the access that finds it (its key's next one)
    finds[0] = n  # a hole: the spare slot past the depths
    finds[1:] = nxt[rank]
    top = int(msz.max())
    big = n + 1  # above every rank: the offset of one restart in a running maximum
    got: list[np.ndarray] = []  # ranks found, level by level (holes too: `finds` sends them past the end)
    got_at: list[tuple[int, int]] = []  # (level, how many)

    # The carries: D sorted best first and padded with holes to the call's size. Every call keeps
    # `narrow` columns (the size of nearly all calls); the columns past them (`ext`) exist only for the
    # few wider calls (prefill calls among decode ones), at `wide`, their indexes among the calls.
    narrow = max(1, min(top, int(np.searchsorted(np.cumsum(np.bincount(msz)), 0.95 * nc))))
    tt = np.arange(nc, dtype=np.int64)  # the calls taking part, in time order
    carry = [np.zeros(nc, dtype=np.int64) for _ in range(narrow)]  # column c: the (c+1)-th best
    wide = np.flatnonzero(msz > narrow)
    ext = np.zeros((top - narrow, len(wide)), dtype=np.int64)  # columns narrow.. of the wide calls
    spill = len(ext) > 0 and len(wide) > 0

    def settle(z: np.ndarray) -> None:
        """Each carry D becomes D + {z} - max (the level kept the best), in place."""
        if spill:
            zw = z.take(wide)
            edge = np.minimum(carry[-1].take(wide), zw)
            np.maximum(edge, ext[0], out=edge)  # the wide calls' last narrow column takes from ext
            shifted = np.minimum(ext[:-1], zw)
            np.maximum(shifted, ext[1:], out=shifted)
            ext[:-1] = shifted
            np.minimum(ext[-1], zw, out=ext[-1])
        for c in range(narrow - 1):  # column c reads column c + 1 before it changes
            d = carry[c]
            np.minimum(d, z, out=d)
            np.maximum(d, carry[c + 1], out=d)
        np.minimum(carry[-1], z, out=carry[-1])
        if spill:
            carry[-1][wide] = edge

    def insert(z: np.ndarray, at: np.ndarray | None, wat: np.ndarray | None) -> None:
        """The carries of the calls at `at` (all if None; `wat`: which of `wide` they include) become
        D + {z} (the call's own key took the level), in place; computed from their old values."""
        zs = z if at is None else z.take(at)
        old = carry if at is None else [c.take(at) for c in carry]
        if spill and (wat is None or len(wat)):
            sel = wide if wat is None else wide.take(wat)
            zw = z.take(sel)
            e = ext if wat is None else ext[:, wat]
            grown = np.minimum(e[:-1], zw)
            np.maximum(grown, e[1:], out=grown)
            first_ext = np.maximum(e[0], np.minimum(carry[-1].take(sel), zw))
            if wat is None:
                ext[1:] = grown
                ext[0] = first_ext
            else:
                ext[1:, wat] = grown
                ext[0, wat] = first_ext
        new = [np.maximum(old[0], zs)] + [np.maximum(old[c], np.minimum(old[c - 1], zs)) for c in range(1, narrow)]
        for c in range(narrow):
            if at is None:
                carry[c] = new[c]
            else:
                carry[c][at] = new[c]

    def index_of(tt: np.ndarray, dtype: Any = np.int64) -> np.ndarray:
        """Per time 0..INF: the index in `tt` of the first call at or after it (len(tt) past the last)."""
        gaps = np.empty(len(tt) + 1, dtype=np.int64)
        gaps[0] = tt[0] + 1
        gaps[1:-1] = tt[1:] - tt[:-1]
        gaps[-1] = INF - tt[-1]
        return np.repeat(np.arange(len(tt) + 1, dtype=dtype), gaps)

    def compact(keep: np.ndarray) -> np.ndarray:
        """Drop the calls not kept; returns old index -> new index of the first call kept from it."""
        nonlocal tt, carry, ext, wide
        renumber = np.zeros(len(tt) + 1, dtype=np.int64)
        np.cumsum(keep, out=renumber[1:])
        tt = tt[keep]
        carry = [c[keep] for c in carry]
        if len(wide):
            kw = keep.take(wide)
            ext = ext[:, kw]
            wide = renumber.take(wide[kw])
        return renumber

    # levels 0..top-1: a call with more keys than the level puts one of its own there
    lvl = 0
    while lvl < top and len(tt):
        k = len(tt)
        here = msz.take(tt)
        own = here > lvl
        everyone = bool(own.all())  # decode traces: every call has top (= top_k) keys
        pstart = np.zeros(k, dtype=bool)  # each partition's first call: the level is empty before it
        pstart[0] = True
        if parted:
            pt = part.take(tt)
            np.not_equal(pt[1:], pt[:-1], out=pstart[1:])
        z = np.empty(k, dtype=np.int64)
        z[0] = 0
        if everyone:  # each call's own key: the level before a call holds the previous call's
            v = val.take(first.take(tt) + lvl)
            z[1:] = v[:-1]
        else:
            oi = np.flatnonzero(own)
            v = carry[0].copy()
            v[oi] = val.take(first.take(tt.take(oi)) + lvl)
            starts = pstart | own
            if not starts.all():  # restarts between the calls that put their own key here
                sm = np.minimum.accumulate(index_of(tt).take(due.take(v))[::-1])[::-1].tolist()
                hs = np.flatnonzero(starts)
                ends = np.append(hs[1:], k)
                more = np.flatnonzero(ends - hs > 1)
                for r, lim in zip(hs[more].tolist(), ends[more].tolist(), strict=True):
                    r = sm[r]
                    while r < lim:
                        starts[r] = True
                        r = sm[r]
            off = np.cumsum(starts) * big
            y = np.maximum.accumulate(v + off) - off
            z[1:] = y[:-1]
        if parted:
            z[pstart] = 0
        hit = due.take(z) == tt  # the key here before the call is one it needs: found at this depth
        got.append(z[hit])
        got_at.append((lvl, int(np.count_nonzero(hit))))
        z[hit] = 0
        if everyone:  # the old key joins the carry: D + {z}, the best kept
            insert(z, None, None)
        else:
            wat = np.flatnonzero(here.take(wide) > lvl) if spill else None
            before = [c.take(oi) for c in carry]  # the forced calls' carries, before settling
            ext_before = ext[:, wat] if spill else None
            settle(z)
            for c in range(narrow):
                carry[c][oi] = before[c]
            if spill:
                ext[:, wat] = ext_before
            insert(z, oi, wat)
        keep = (carry[0] > 0) | (here > lvl + 1)
        if not keep.all():
            compact(keep)
        lvl += 1

    # levels >= top: every call's keys are above; the lean loop
    dt = np.int32 if (nc + 2) * (n + 2) < 2**31 - 1 else np.int64
    carry = [c.astype(dt) for c in carry]
    ext = ext.astype(dt)
    steps = np.arange(0, (len(tt) + 1) * big, big, dtype=dt)  # the offset of each restart
    if len(tt):  # per rank: the index of the call that next uses its key (the first one at or after it)
        hop = index_of(tt, dt).take(due)
    while len(tt):  # one layout of the calls taking part, kept until a quarter of them has dropped out
        k = len(tt)
        uses = memoryview(hop)
        pt = part[tt]
        ps = np.flatnonzero(np.concatenate(([True], pt[1:] != pt[:-1])))  # each partition's first call
        parts = list(zip(ps.tolist(), np.append(ps[1:], k).tolist(), strict=True))
        many = len(ps) > 1  # several partitions (per_layer): each one's first call starts on an empty level
        spill = len(ext) > 0 and len(wide) > 0
        d0 = carry[0]  # the carries change in place from level to level
        back = d0[::-1]
        scan = np.empty(k, dtype=dt)  # scan[r] = max(d0[r:]) (with partitions: min of their next uses)
        into = scan[::-1]  # the accumulations run from the last call back
        seen = memoryview(scan)
        buf = np.zeros(k + 1, dtype=dt)
        y, z = buf[1:], buf[:-1]  # y: the level's key after each call; z: before it (0 before the first)
        while True:
            # restarts: from a partition's first call, the call that next uses the soonest-needed carry
            seg: list[int] = []
            add = seg.append
            if many:
                np.minimum.accumulate(hop.take(d0)[::-1], out=into)
                for r, lim in parts:
                    while r < lim:
                        add(r)
                        r = seen[r]
            else:  # one partition: a better rank is never needed later, so the soonest is the best one's
                np.maximum.accumulate(back, out=into)
                r = 0
                while r < k:
                    add(r)
                    r = uses[seen[r]]
            add(k)
            bounds = np.array(seg, dtype=np.int64)
            sa = bounds[:-1]  # where the level restarts, in order
            off = np.repeat(steps[: len(sa)], bounds[1:] - sa)
            np.add(d0, off, out=y)
            np.maximum.accumulate(y, out=y)
            np.subtract(y, off, out=y)
            if many:
                z[ps] = 0
            got.append(z.take(sa))  # the keys needed where the level restarts (a partition's start: a hole)
            got_at.append((lvl, len(sa)))
            z[sa] = 0
            settle(z)
            lvl += 1
            if lvl % 4 == 0 and np.count_nonzero(d0) < 0.75 * k:  # a quarter of the carries are empty
                hop = compact(d0 > 0).astype(dt).take(hop)
                break
    if got:
        found = np.full(n + 1, NEVER, dtype=np.int64)
        levels = np.repeat(np.array([a for a, _ in got_at], dtype=np.int64), [b for _, b in got_at])
        found[finds.take(np.concatenate(got))] = levels
        depth[:] = found[:n]
    return depth


def _opt_depths_walk(calls: Calls, partition: Partition = "global") -> np.ndarray:
    """`opt_depths` call by call, as a Python walk down the priority stack: the reference it is tested
    against (and the benchmark's baseline), O(depth of the call's deepest key) Python steps per call.

    A key's keep-priority after its access at position i is (sooner next use, then more recent), packed
    into one int, (n_calls - next_use) * n + i: the keys of a stack have distinct ones, and the packed
    value names the access (i = value mod n), hence the key. A key's priority changes only when it is
    accessed, and then it goes to the top, so the stack keeps each entry's priority beside it.

    The update for a call with need set N (|N| = m): the keys of N go to the top; the keys displaced
    from the top m levels form the set D; walking down the old stack from level m, each level takes
    the best of D and the key found there (which joins D), and a level that held a key of N takes the
    best of D. That makes the top C of the new stack N + best(C - m, (old top C) - N) for every C, as
    the policy's eviction does. A key better than every key in D stays where it is, so the walk only
    touches the levels where something moves, and stops below the call's deepest key once D is empty.
    """
    n = calls.accesses
    depth = np.full(n, NEVER, dtype=np.int64)
    if n == 0:
        return depth
    keys = calls.keys.tolist()
    score = ((calls.n_calls - _next_use(calls)) * n + np.arange(n, dtype=np.int64)).tolist()
    starts = calls.starts.tolist()
    e = calls.model.num_experts
    n_parts = calls.model.num_moe_layers if partition == "per_layer" else 1
    stacks: list[list[int]] = [[] for _ in range(n_parts)]  # keys, top first
    # their packed priorities level by level, and one more: -1, below every priority, ends each walk
    prios: list[list[int]] = [[-1] for _ in range(n_parts)]
    seen: set[int] = set()
    out: list[int] = [int(NEVER)] * n
    heappop, heapreplace, heapify = heapq.heappop, heapq.heapreplace, heapq.heapify
    for c in range(len(starts) - 1):
        a, b = starts[c], starts[c + 1]
        need = keys[a:b]
        p = need[0] // e if n_parts > 1 else 0
        st, pr = stacks[p], prios[p]
        m = b - a
        size = len(st)
        heap = [-pr[i] for i in range(min(m, size)) if st[i] not in need]  # D, the best on top
        for j, k in enumerate(need):
            if k in seen:
                d = st.index(k)
                out[a + j] = d
                pr[d] = -1  # the walk stops at the call's own keys too
            else:
                seen.add(k)
        rest: list[int] = []
        if heap:
            heapify(heap)
            i = m
            while i < size:
                best = -heap[0]
                while pr[i] > best:  # better than all of D: stays where it is
                    i += 1
                if i == size:
                    break
                if pr[i] < 0:  # a key of the call was here: the best of D takes its level
                    v = -heappop(heap)
                else:  # worse than the best of D: they change places
                    v = -heapreplace(heap, -pr[i])
                st[i] = keys[v % n]
                pr[i] = v
                i += 1
                if not heap:  # only when no key of the call is new: the rest stays
                    break
            rest = sorted(heap)  # keys displaced past the bottom (as many as the call has new keys), best first
        if size >= m:
            st[0:m] = need
            pr[0:m] = score[a:b]
            if rest:
                st.extend(keys[-v % n] for v in rest)
                pr[size:size] = [-v for v in rest]
        else:
            st[:] = need + [keys[-v % n] for v in rest]
            pr[:] = score[a:b] + [-v for v in rest] + [-1]
    depth[:] = out
    return depth


# -- sizes the stacks do not cover: the policies themselves -----------------------------------------
def simulate_hits(calls: Calls, policy: str, cache: CacheConfig) -> int:
    """Hits of `policy` (a demand policy: `lru`, `belady`, ...) over the calls, counted by the policy's
    own `plan` and `apply_plan`, as the simulator does, without its clock: every copy has landed before
    the next call plans, as in `sim.replay` (a demand call waits for its loads)."""
    model = calls.model
    ca = cache.build(model)
    pol = make_policy(policy)
    tuples = calls.key_tuples()
    pol.reset(model, ca, None, Future(tuples) if pol.wants_future() else None)
    counters = Counters()
    sizes = {"full": model.expert_bytes}
    steps = calls.steps.tolist()
    for c, need in enumerate(tuples):
        m = len(need)
        # a one-row request whose weights fall in access order reproduces the call's access order
        req = LayerRequest(steps[c], "decode", need[0][0], [[k[1] for k in need]], [[float(m - j) for j in range(m)]])
        plan = pol.plan(req, ca)
        apply_plan(ca, req, plan, counters, sizes)
        for ld in plan.loads:
            ca.complete(ld.key)
    return counters.hits


# -- the curves ------------------------------------------------------------------------------------
def hits_below(depths: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """For each size C: how many depths are < C."""
    finite = np.sort(depths[depths != NEVER])
    return np.searchsorted(finite, np.asarray(sizes, dtype=np.int64), side="left").tolist()


@dataclass
class Curves:
    path: str
    sha256: str | None
    partition: Partition
    calls: Calls
    sizes: list[int]
    methods: list[str]
    lru: list[int]
    opt: list[int]
    distinct: int
    largest_call: int
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        n = self.calls.accesses
        rate = (lambda h: h / n) if n else (lambda h: 0.0)
        return [
            {
                "size": s,
                "method": m,
                "lru": {"hits": lh, "accesses": n, "hit_rate": rate(lh)},
                "opt": {"hits": oh, "accesses": n, "hit_rate": rate(oh)},
            }
            for s, m, lh, oh in zip(self.sizes, self.methods, self.lru, self.opt, strict=True)
        ]

    @property
    def compulsory_max_hit_rate(self) -> float:
        n = self.calls.accesses
        return 1 - self.distinct / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        model = self.calls.model
        n = self.calls.accesses
        return {
            "tool": TOOL,
            "trace": {"path": self.path, "sha256": self.sha256, "truncated": self.calls.truncated},
            "model": {
                "name": model.name,
                "num_moe_layers": model.num_moe_layers,
                "num_experts": model.num_experts,
                "top_k": model.top_k,
                "expert_bytes": model.expert_bytes,
            },
            "partition": self.partition,
            "size_unit": "slots per MoE layer" if self.partition == "per_layer" else "slots (all layers)",
            "layer_calls": self.calls.n_calls,
            "accesses": n,
            "distinct_keys": self.distinct,
            "largest_call": self.largest_call,
            "compulsory": {"misses": self.distinct, "max_hits": n - self.distinct, "max_hit_rate": self.compulsory_max_hit_rate},
            "policies": {"lru": "lru", "opt": "belady"},
            "notes": self.notes,
            "curves": self.rows(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def compute_curves(
    calls: Calls,
    partition: Partition = "global",
    max_slots: int | None = None,
    *,
    path: str = "",
    sha256: str | None = None,
    stack_only: bool = False,
) -> Curves:
    """LRU and OPT hits at every size from top_k (the smallest cache a replay accepts) to `max_slots`
    (default: the size at which every key fits, in the partition)."""
    if partition not in ("global", "per_layer"):
        raise ValueError(f"partition must be 'global' or 'per_layer', got {partition!r}")
    model = calls.model
    top_k = model.top_k
    n = calls.accesses
    largest = int(calls.call_sizes().max()) if calls.n_calls else top_k
    distinct = int(len(np.unique(calls.keys)))
    if partition == "per_layer":
        per_layer = np.bincount(np.unique(calls.keys) // model.num_experts, minlength=1)
        fits = int(per_layer.max()) if n else top_k
    else:
        fits = distinct
    hi = max(top_k, fits) if max_slots is None else max_slots
    if hi < top_k:
        raise CacheError(f"--max-slots {hi} is below top_k={top_k}: no cache that small holds one token's experts")
    first = max(top_k, largest) if stack_only else top_k
    sizes = list(range(first, hi + 1))
    stack_sizes = [s for s in sizes if s >= largest]
    small = [s for s in sizes if s < largest]
    notes = [
        f"sizes >= {largest} (the most distinct experts one layer call needs) come from one stack pass per "
        "policy; inclusion holds there"
    ]
    if small:
        notes.append(
            f"sizes {small[0]}-{small[-1]} are below {largest}: a call that needs more experts than the partition "
            "holds streams them through its slots and inclusion breaks, so each was simulated with the policy itself"
        )
    elif stack_only and largest > top_k:
        notes.append(f"sizes {top_k}-{largest - 1} left out (--stack-only)")
    lru = hits_below(lru_depths(calls, partition), stack_sizes) if stack_sizes else []
    opt = hits_below(opt_depths(calls, partition), stack_sizes) if stack_sizes else []
    lru_small, opt_small = [], []
    for s in small:
        cfg = CacheConfig(per_layer=s) if partition == "per_layer" else CacheConfig(experts=s)
        lru_small.append(simulate_hits(calls, "lru", cfg))
        opt_small.append(simulate_hits(calls, "belady", cfg))
    return Curves(
        path=path,
        sha256=sha256,
        partition=partition,
        calls=calls,
        sizes=sizes,
        methods=["simulated"] * len(small) + ["stack"] * len(stack_sizes),
        lru=lru_small + lru,
        opt=opt_small + opt,
        distinct=distinct,
        largest_call=largest,
        notes=notes,
    )


def curves(
    trace: str | os.PathLike[str],
    partition: Partition = "global",
    max_slots: int | None = None,
    *,
    allow_truncated: bool = False,
    stack_only: bool = False,
) -> Curves:
    """Read `trace` and compute its curves (see `compute_curves`)."""
    calls = read_calls(trace, allow_truncated=allow_truncated)
    res = compute_curves(calls, partition, max_slots, path=str(trace), sha256=file_digest(Path(trace)), stack_only=stack_only)
    if calls.truncated:
        res.notes.append("the trace is truncated (no footer): curves of what it holds")
    return res


# -- output ----------------------------------------------------------------------------------------
def table(res: Curves, max_rows: int = 40) -> str:
    d = res.to_dict()
    unit = "slots per layer" if res.partition == "per_layer" else "slots"
    head = [
        f"trace      {res.path} ({d['model']['name']}, {d['layer_calls']} layer calls, {d['accesses']} accesses)",
        f"partition  {res.partition} (size = {unit})",
        f"compulsory {d['distinct_keys']} distinct keys: hit rate at most {res.compulsory_max_hit_rate:.4f}",
        f"largest call {res.largest_call} distinct experts",
        "",
    ]
    rows = res.rows()
    shown = rows
    if len(rows) > max_rows:  # evenly spaced, first and last always
        idx = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
        shown = [rows[i] for i in idx]
    lines = [f"{'size':>6}  {'LRU':>8}  {'OPT':>8}  {'LRU hits':>9}  {'OPT hits':>9}  method"]
    for r in shown:
        lines.append(
            f"{r['size']:>6}  {r['lru']['hit_rate']:>8.4f}  {r['opt']['hit_rate']:>8.4f}  "
            f"{r['lru']['hits']:>9}  {r['opt']['hits']:>9}  {r['method']}"
        )
    tail = [f"({len(shown)} of {len(rows)} sizes shown; --out has all)"] if len(shown) < len(rows) else []
    return "\n".join(head + lines + tail + [""] + [f"note: {x}" for x in res.notes])


def figure(res: Curves) -> Any:
    import plotly.graph_objects as go

    rows = res.rows()
    x = [r["size"] for r in rows]
    unit = "slots per MoE layer" if res.partition == "per_layer" else "expert slots, all layers"
    fig = go.Figure()
    for name, key, colour in (("Belady (OPT)", "opt", "#2ca02c"), ("LRU", "lru", "#1f77b4")):
        fig.add_trace(
            go.Scatter(
                x=x, y=[r[key]["hit_rate"] for r in rows], name=name, mode="lines+markers" if len(x) <= 64 else "lines",
                line={"color": colour},
                customdata=[[r[key]["hits"], r[key]["accesses"], r["method"]] for r in rows],
                hovertemplate="size %{x}<br>hit rate %{y:.4f}<br>%{customdata[0]} / %{customdata[1]} (%{customdata[2]})"
                f"<extra>{name}</extra>",
            )
        )
    if x:
        bound = res.compulsory_max_hit_rate
        fig.add_trace(
            go.Scatter(
                x=[x[0], x[-1]], y=[bound, bound], name="compulsory-miss bound", mode="lines",
                line={"color": "#d62728", "dash": "dash"},
                hovertemplate=f"1 - {res.distinct} distinct / {res.calls.accesses} accesses = {bound:.4f}<extra></extra>",
            )
        )
    small = [r["size"] for r in rows if r["method"] == "simulated"]
    if small:
        fig.add_vrect(x0=small[0] - 0.5, x1=small[-1] + 0.5, fillcolor="#eee", line_width=0, layer="below",
                      annotation_text="simulated per size", annotation_position="top left")
    fig.update_layout(
        title=f"hit rate vs cache size: {Path(res.path).name}, {res.partition} partition",
        xaxis_title=f"cache size ({unit})",
        yaxis_title="hit rate",
        yaxis={"range": [0, 1.02]},
        legend_title_text="policy",
        hovermode="x unified",
    )
    return fig


def write_html(res: Curves, path: str | os.PathLike[str]) -> None:
    """A self-contained HTML file (plotly.js inlined: opens without a network)."""
    write_text_atomic(path, figure(res).to_html(include_plotlyjs=True, full_html=True))


# -- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sim.curves", description="LRU, Belady and compulsory hit-rate curves over every cache size.")
    p.add_argument("trace", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--partition", choices=["global", "per_layer"], default="global",
                   help="one cache shared by all layers (size = slots) or one per layer (size = slots per layer)")
    p.add_argument("--max-slots", type=int, metavar="N", help="largest size (default: where every key fits)")
    p.add_argument("--out", type=Path, help="write the curves as JSON")
    p.add_argument("--html", type=Path, help="write a plotly chart (self-contained HTML)")
    p.add_argument("--allow-truncated", action="store_true", help="use a trace that has no footer")
    p.add_argument("--stack-only", action="store_true",
                   help="leave out sizes below the largest call (they need one simulation per size)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "sim.curves"
    if args.max_slots is not None and args.max_slots < 1:
        print(f"{prog}: error: --max-slots must be at least 1, got {args.max_slots}", file=sys.stderr)
        return 2
    try:
        res = curves(args.trace, args.partition, args.max_slots, allow_truncated=args.allow_truncated,
                     stack_only=args.stack_only)
    except (TraceError, CacheError, PolicySpecError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a trace that exists but cannot be read (permissions, a device error)
        print(f"{prog}: error: cannot read {args.trace}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(table(res))
    try:
        if args.out:
            write_text_atomic(args.out, res.to_json())
            print(f"\nwrote {args.out}")
        if args.html:
            write_html(res, args.html)
            print(f"wrote {args.html}")
    except OSError as exc:
        print(f"{prog}: error: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
