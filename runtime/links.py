"""The host-to-device link: how an expert's weights get from the slow tier into a GPU slot.

- `cuda`: copies on a dedicated CUDA stream (a high-priority one for urgent loads, a low-priority
  one for prefetches); the compute stream waits on the copy's event, and a copy into a slot waits on
  the event recorded after the last compute that read the slot. No host sync anywhere on this path.
- `emulated:<bandwidth>[,<latency>]`: a copy thread that holds each transfer to
  `latency + bytes / bandwidth` (urgent loads before prefetches, a started copy never pre-empted), so
  the whole loop runs, and can be timed, on a machine without a GPU.
"""

from __future__ import annotations

import heapq
import itertools
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class LinkError(ValueError):
    pass


class LinkSpec(BaseModel):
    """A parsed `--link` string."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = Field(pattern="^(cuda|emulated)$")
    bandwidth_Bps: float | None = None
    latency_s: float = 0.0

    def __str__(self) -> str:
        if self.kind == "cuda":
            return "cuda"
        return f"emulated:{self.bandwidth_Bps / 1e9:g}GB/s,{self.latency_s * 1e6:g}us"


def parse_link(spec: str) -> LinkSpec:
    """`cuda`, `emulated:16GB/s` or `emulated:16GB/s,10us` (bandwidth in B/s with k/M/G/T prefixes)."""
    text = spec.strip()
    if text == "cuda":
        return LinkSpec(kind="cuda")
    m = re.fullmatch(r"emulated:\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmgt]?)b/s\s*(?:,\s*([0-9.]+(?:e[+-]?\d+)?)\s*(s|ms|us|µs|ns))?", text, re.I)
    if not m:
        raise LinkError(f"unknown link {spec!r}; expected 'cuda' or 'emulated:<bandwidth>[,<latency>]', e.g. 'emulated:16GB/s,10us'")
    bw = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if bw <= 0:
        raise LinkError(f"link {spec!r}: bandwidth must be positive")
    lat = float(m.group(3)) * _TIME[m.group(4).lower()] if m.group(3) else 0.0
    return LinkSpec(kind="emulated", bandwidth_Bps=bw, latency_s=lat)


@dataclass(eq=False)
class Copy:
    """One expert's weights into one slot."""

    key: tuple[int, int]
    src: torch.Tensor
    dst: torch.Tensor
    urgent: bool
    wait: list[Any] = field(default_factory=list)  # what must finish before the slot may be written
    post: Callable[[], None] | None = None  # device work after the bytes landed (dequantising a low copy)
    done: Any = None  # threading.Event (emulated) or torch.cuda.Event (cuda)
    start_ns: int = 0
    end_ns: int = 0

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()


class EmulatedLink:
    """A copy thread that takes `latency + bytes / bandwidth` per copy, urgent copies first."""

    kind = "emulated"

    def __init__(self, spec: LinkSpec):
        assert spec.bandwidth_Bps is not None
        self.spec = spec
        self._heap: list[tuple[int, int, Copy]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self.busy_ns = 0
        self.copies = 0
        self.bytes_moved = 0  # what really crossed the link (a low-precision copy: its quantised bytes)
        self._thread = threading.Thread(target=self._run, name="moe-offload-link", daemon=True)
        self._thread.start()

    def submit(self, copy: Copy) -> None:
        copy.done = threading.Event()
        with self._cv:
            heapq.heappush(self._heap, (0 if copy.urgent else 1, next(self._seq), copy))
            self._cv.notify()

    def wait(self, copy: Copy) -> None:
        """Block the compute thread until the copy has landed."""
        copy.done.wait()

    def is_done(self, copy: Copy) -> bool:
        return copy.done.is_set()

    def _run(self) -> None:
        # Copies whose slot is still in use (the compute of its previous occupant in the current call
        # not done) are parked: off the queue, not holding the link, so that what can be copied is
        # copied meanwhile (a prefetch the compute waits for, say); once the slot is free a parked
        # copy goes back to its old place in the queue. The simulator's copy engines do the same.
        parked: list[tuple[int, int, Copy]] = []
        while True:
            with self._cv:
                while True:
                    ready = [p for p in parked if all(ev.is_set() for ev in p[2].wait)]
                    best = min(ready, key=lambda p: p[:2]) if ready else None
                    if best is not None and (not self._heap or best[:2] < self._heap[0][:2]):
                        parked.remove(best)
                        entry = best
                        break
                    if self._heap:
                        entry = heapq.heappop(self._heap)
                        break
                    if self._closed:
                        return
                    self._cv.wait(timeout=_POLL_S if parked else None)  # a submit, or a slot freed
                # a copy whose slot's previous copy is still queued (an urgent load evicted a
                # prefetch that has not started) would wait behind a copy it outranks: that one
                # goes first, and this one back to its place
                run = entry
                while (dep := self._take_queued(run[2].wait)) is not None:
                    heapq.heappush(self._heap, run)
                    run = dep
                if not all(ev.is_set() for ev in run[2].wait):
                    parked.append(run)
                    continue
            self._copy(run[2])

    def _take_queued(self, events: list[Any]) -> tuple[int, int, Copy] | None:
        """The queued copy (taken off the queue, with its place) whose landing one of `events` is."""
        for ev in events:
            if isinstance(ev, threading.Event) and not ev.is_set():
                for i, entry in enumerate(self._heap):
                    if entry[2].done is ev:
                        self._heap[i] = self._heap[-1]
                        self._heap.pop()
                        heapq.heapify(self._heap)
                        return entry
        return None

    def _copy(self, copy: Copy) -> None:
        for ev in copy.wait:
            ev.wait()
        start = time.perf_counter_ns()
        copy.dst.copy_(copy.src)
        if copy.post is not None:
            copy.post()
        target = start + int((self.spec.latency_s + copy.nbytes / self.spec.bandwidth_Bps) * 1e9)
        _sleep_until(target)
        copy.start_ns, copy.end_ns = start, time.perf_counter_ns()
        self.busy_ns += copy.end_ns - start
        self.copies += 1
        self.bytes_moved += copy.nbytes
        copy.done.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)


_POLL_S = 50e-6  # how often the copy thread looks whether a parked copy's slot was freed


def _sleep_until(target_ns: int) -> None:
    """Sleep most of the way (the OS wakes late by tens of microseconds), spin the last 80 us: a
    longer spin would take a core from the compute thread on a small machine."""
    while True:
        left = target_ns - time.perf_counter_ns()
        if left <= 0:
            return
        if left > 100_000:
            time.sleep((left - 80_000) / 1e9)


class CudaLink:
    """Copies on dedicated CUDA streams; everything is ordered by events, nothing syncs the host."""

    kind = "cuda"

    def __init__(self, spec: LinkSpec, device: torch.device):
        if not torch.cuda.is_available():
            raise LinkError("link 'cuda' needs a CUDA device; use 'emulated:<bandwidth>' on this machine")
        self.spec = spec
        self.device = device
        lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
        self.urgent_stream = torch.cuda.Stream(device=device, priority=hi)
        self.prefetch_stream = torch.cuda.Stream(device=device, priority=lo)
        self.copies = 0
        self.bytes_moved = 0
        self.busy_ns = 0  # not measured per copy on CUDA (that would need a host sync)

    def submit(self, copy: Copy) -> None:
        stream = self.urgent_stream if copy.urgent else self.prefetch_stream
        for ev in copy.wait:  # the slot's previous copy and reader must have finished
            stream.wait_event(ev.done if isinstance(ev, Copy) else ev)
        with torch.cuda.stream(stream):
            copy.dst.copy_(copy.src, non_blocking=True)
            if copy.post is not None:  # on the copy stream, before the copy's event
                copy.post()
            copy.done = torch.cuda.Event()
            copy.done.record(stream)
        self.copies += 1
        self.bytes_moved += copy.nbytes

    def wait(self, copy: Copy) -> None:
        """Make the compute stream (not the host) wait for the copy."""
        torch.cuda.current_stream(self.device).wait_event(copy.done)

    def is_done(self, copy: Copy) -> bool:
        return bool(copy.done.query())

    def close(self) -> None:
        pass


def make_link(spec: str | LinkSpec, device: torch.device) -> EmulatedLink | CudaLink:
    s = parse_link(spec) if isinstance(spec, str) else spec
    if s.kind == "cuda":
        if device.type != "cuda":
            raise LinkError("link 'cuda' needs the model on a CUDA device")
        return CudaLink(s, device)
    return EmulatedLink(s)
