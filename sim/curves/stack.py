"""Stack distances: the depth of every access in the LRU stack and in Belady's priority stack, for all
accesses at once (see `sim.curves` for why one stack gives the hits at every cache size).

The Python walk `opt_depths` is tested against lives in `tests/curves_reference.py`."""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from sim.curves.calls import Calls

Partition = Literal["global", "per_layer"]
NEVER = np.iinfo(np.int64).max  # the depth of a first access: a miss at every size


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

    The stack is the one `_opt_depths_walk` (tests/curves_reference.py) keeps (the same depths, every one), computed level by
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



def hits_below(depths: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """For each size C: how many depths are < C."""
    finite = np.sort(depths[depths != NEVER])
    return np.searchsorted(finite, np.asarray(sizes, dtype=np.int64), side="left").tolist()

