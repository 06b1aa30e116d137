"""The reference `sim.curves.stack.opt_depths` is tested (and benchmarked) against: the same Belady
priority stack, walked call by call in Python."""


from __future__ import annotations

import heapq

import numpy as np

from sim.curves.calls import Calls
from sim.curves.stack import NEVER, Partition, _next_use


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

