"""The H2D copy engines of the SimPy model: `link.copy_engines` servers fed by one priority queue.

Urgent loads go before prefetches, first come first served within each class, and a started copy
is never pre-empted. A copy into a slot first waits for the slot's previous occupant to be released
(its own copy landed, and its compute done if the current call uses it); it waits off the queue,
without an engine, so the engines copy something else meanwhile. The runtime's emulated link does the
same (`runtime.links.EmulatedLink`).

A server in SimPy's own style (as its resources are built): a started copy is a Timeout whose
callback finishes it and starts the next, so an uncontended copy costs one event.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import simpy

from policies import ExpertCache, Key, LayerPlan
from policies.costs import CostModel

URGENT, PREFETCH = 0, 1


@dataclass(slots=True)
class Transfer:
    """One copy of one expert into one slot."""

    key: Key
    nbytes: int
    wait: list[simpy.Event]
    step: int
    urgent: bool
    copy: simpy.Event | None = None  # the Timeout, once the copy has started
    end: float | None = None  # when it lands, once started
    waiter: simpy.Event | None = None  # for whoever must wait before it has started
    dep: Transfer | None = None  # the copy out of this one's slot (its victim's), if it was still in flight
    state: str = "queued"  # "queued", "parked" (off the queue until its slot is free) or "taken" (started)
    prio: int = 0  # its place in the copy queue: (prio, seq)
    seq: int = 0

    def event(self, env: simpy.Environment) -> simpy.Event:
        """An event that fires when the copy lands."""
        if self.copy is not None:
            return self.copy
        if self.waiter is None:
            self.waiter = env.event()
        return self.waiter


class CopyEngine:
    """The link's copy engines: `engines` servers sharing the link's bandwidth equally."""

    def __init__(self, env: simpy.Environment, costs: CostModel, cache: ExpertCache, engines: int = 1,
                 on_interval: Callable[[str, float, float, str, int], None] | None = None):
        self.env, self.costs, self.cache, self.engines = env, costs, cache, engines
        self.on_interval = on_interval  # (lane, start, end, label, step) of every copy that landed
        self.queue: list[tuple[int, int, int, Transfer]] = []  # (prio, seq, tiebreak, transfer)
        self.free: list[int] = list(range(engines))  # idle engines
        self.loading: dict[Key, Transfer] = {}  # keys whose copy is queued or running
        self.busy_s = 0.0  # summed duration of the copies that landed
        self.on_begin: Callable[[Transfer], None] | None = None  # told when a copy starts (its end is known)
        self.parked = 0  # copies off the queue, waiting for their slot
        self.running: dict[int, float] = {}  # engine -> when its copy lands
        self._seq = itertools.count()
        self._durations: dict[int, float] = {}  # bytes -> seconds of one copy

    @property
    def idle(self) -> bool:
        """Nothing copying and nothing queued."""
        return len(self.free) == self.engines and not self.queue

    def _push(self, tr: Transfer, prio: int | None = None) -> None:
        """Queue a copy: a new one at the end of its class, a parked one back at its old place."""
        if prio is not None:
            tr.prio, tr.seq = prio, next(self._seq)
        tr.state = "queued"
        heapq.heappush(self.queue, (tr.prio, tr.seq, next(self._seq), tr))

    def start(self, at: float | None = None) -> None:
        """Give idle engines the head of the queue (starting at `at`, default the present)."""
        while self.free and self.queue:
            entry = heapq.heappop(self.queue)
            tr = entry[3]
            if tr.state != "queued":  # a stale entry: the copy was taken along by one into its slot (below)
                continue
            # A copy whose slot's previous copy is still queued (an urgent load evicted a prefetch that
            # has not started) would wait behind a copy it outranks: that copy goes first, on this
            # engine, and this one goes back to its place.
            run = tr
            while run.dep is not None and run.dep.state == "queued":
                run = run.dep
            if run is not tr:
                heapq.heappush(self.queue, entry)
                tr = run
            pending = [ev for ev in tr.wait if not ev.processed]
            if pending:  # its slot is not free yet: off the queue, without an engine, until it is
                self._park(tr, pending)
                continue
            tr.state = "taken"
            self.free.sort()
            self._begin(tr, self.free.pop(0), self.env.now if at is None else at)

    def _park(self, tr: Transfer, pending: list[simpy.Event]) -> None:
        """A copy whose slot is still in use (its previous occupant's copy running, or its compute in
        the current call not done) leaves the queue and takes no engine, so the engines copy what
        can be copied meanwhile (a prefetch the compute stream waits for, say); once the slot is
        free it goes back to its old place in the queue, ahead of everything queued after it."""
        tr.state = "parked"
        self.parked += 1

        def retry(_: simpy.Event) -> None:
            rest = [ev for ev in pending if not ev.processed]
            if rest:
                rest[0].callbacks.append(retry)
            else:
                self.parked -= 1
                self._push(tr)
                self.start()

        pending[0].callbacks.append(retry)

    def _begin(self, tr: Transfer, lane: int, start: float) -> None:
        env = self.env
        duration = self._durations.get(tr.nbytes)
        if duration is None:
            duration = self._durations[tr.nbytes] = self.costs.h2d_latency_s + tr.nbytes / self.costs.h2d_bytes_per_s
        tr.end = start + duration
        self.running[lane] = tr.end
        tr.copy = env.timeout(tr.end - env.now)
        tr.copy.callbacks.append(partial(self._finish, tr, lane, start))
        if self.on_begin is not None:
            self.on_begin(tr)

    def _finish(self, tr: Transfer, lane: int, start: float, _: simpy.Event) -> None:
        now = self.env.now
        self.busy_s += now - start
        if self.on_interval is not None:
            kind = "load" if tr.urgent else "prefetch"
            self.on_interval(f"h2d{lane}", start, now, f"{kind} L{tr.key[0]}E{tr.key[1]}", tr.step)
        if self.loading.get(tr.key) is tr:
            del self.loading[tr.key]
            self.cache.complete(tr.key)
        if tr.waiter is not None:
            tr.waiter.succeed()
        self.running.pop(lane, None)
        self.free.append(lane)
        if self.queue:
            self.start()

    def transfer(self, load_key: Key, victim: Key | None, variant: str, step: int, urgent: bool,
                 release: dict[Key, simpy.Event]) -> Transfer:
        """The copy of one of a plan's loads, its waits found (the victim's own copy still in
        flight, the victim's compute in this call), registered as loading; not yet submitted."""
        env, loading = self.env, self.loading
        wait: list[simpy.Event] = []
        dep = None
        if victim is not None:
            prev = loading.pop(victim, None)  # evicting a key still in flight: wait for its copy
            if prev is not None:
                wait.append(prev.event(env))
                dep = prev
            rel = release.get(victim)
            if rel is not None:
                wait.append(rel)
        tr = Transfer(load_key, self.costs.variant_bytes[variant], wait, step, urgent)
        if dep is not None and dep.state != "taken":
            tr.dep = dep
        loading[load_key] = tr
        return tr

    def submit(self, tr: Transfer, prio: int, at: float) -> None:
        """Hand a copy to the engines at time `at` (the present, or later when the caller runs ahead
        of the clock with every engine idle and the queue empty)."""
        free = self.free
        if not tr.wait and not self.queue and free:  # an idle engine takes it at once (the lowest idle one)
            tr.state = "taken"
            if len(free) > 1:
                free.sort()
            self._begin(tr, free.pop(0), at)
        else:
            self._push(tr, prio)
            self.start(at)

    def can_submit_at(self, tr: Transfer, at: float) -> bool:
        """Whether a copy handed over at the future time `at` may be submitted now, with the same
        result: nothing parked, its slot free, and no engine that could take it before `at`."""
        if at <= self.env.now:
            return True
        if self.parked or any(not ev.processed for ev in tr.wait):
            return False
        if self.free:
            return not self.queue
        return all(end >= at for end in self.running.values())

    def issue(self, plan: LayerPlan, step: int, release: dict[Key, simpy.Event], at: float) -> list[Transfer]:
        """Queue all of a plan's copies (urgent loads, then prefetches) at `at`; returns the urgent ones."""
        urgent: list[Transfer] = []
        for prio, group in ((URGENT, plan.loads), (PREFETCH, plan.prefetch)):
            for ld in group:
                tr = self.transfer(ld.key, ld.victim, ld.variant, step, prio == URGENT, release)
                self.submit(tr, prio, at)
                if prio == URGENT:
                    urgent.append(tr)
        return urgent
