"""The two tiers of an offloaded model: the slow tier (`ExpertStore`, every routed expert in host
memory) and the fast tier (`SlotPool`, a fixed number of expert slots on the device).

The slow tier is an arena of one host buffer per MoE layer (an `experts x expert-size` tensor, one
row per expert), page-locked while a pin budget lasts (`pin_bytes`, the CLIs' `--pin-gb`) and
pageable beyond it: a layer straddling the budget gets a pinned and a pageable chunk. It is filled
layer by layer from the experts modules' own parameters, and with `release=True` each layer's
parameters are replaced right after by meta tensors of the same shape and dtype (no memory, the
model's structure intact), so the experts never exist twice beyond one layer. A store attached to
the model (`attach_store`) is the model's expert memory from then on: every session uses it, and
`restore` puts the weights back, layer by layer, where they came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from policies import Key
from runtime.introspect import MoELayer, OffloadError, _expert_parts
from runtime.quant import Quantizer

_ATTR = "_moe_offload_store"


class ExpertStore:
    """The slow tier: every routed expert's weights (gate/up, down, biases) in one contiguous host
    buffer (`buffers[key]`, a row of its layer's arena), and, for a policy that loads low-precision
    copies, each expert quantised as well (`low`: one byte buffer per expert, see `runtime.quant`).

    `pin`: page-lock the arena (for a CUDA device); `pin_bytes`: at most that many bytes pinned
    (None: no cap), the rest pageable; `pinned_bytes` / `pageable_bytes` say what came of it
    (`pin_error` why pinning stopped early, if the system refused it)."""

    def __init__(self, layers: list[MoELayer], pin: bool, low_bits: int | None = None, *,
                 pin_bytes: int | None = None, release: bool = False):
        ex = layers[0].experts
        self.parts = _expert_parts(ex)
        self.shapes = [tuple(getattr(ex, p).shape[1:]) for p in self.parts]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.dtype = getattr(ex, self.parts[0]).dtype
        self.expert_bytes = self.numel * torch.empty(0, dtype=self.dtype).element_size()
        self.buffers: dict[Key, torch.Tensor] = {}
        self.pinned: set[Key] = set()
        self.low: dict[Key, torch.Tensor] = {}
        self.quantizer: Quantizer | None = None
        self.pinned_bytes = self.pageable_bytes = 0
        self.pin_error: str | None = None
        self.origin: dict[int, torch.device] = {}
        self._chunks: dict[int, list[torch.Tensor]] = {}
        budget = None if pin_bytes is None else max(int(pin_bytes), 0)
        for ly in layers:
            if [tuple(getattr(ly.experts, p).shape[1:]) for p in self.parts] != self.shapes:
                raise OffloadError(f"experts of {ly.name} differ in shape from the first MoE layer's: slots must be uniform")
            if any(getattr(ly.experts, p).is_meta for p in self.parts):
                raise OffloadError(f"the experts of {ly.name} hold no weights (meta tensors): load the model with its weights first")
            n = int(ly.experts.num_experts)
            k = n if not pin else n if budget is None else min(n, budget // self.expert_bytes)
            rows, got = self._arena(ly.index, n, k if pin else 0)
            if budget is not None:
                budget -= got * self.expert_bytes
            self.origin[ly.index] = getattr(ly.experts, self.parts[0]).device
            off = 0
            # part by part (gate/up of every expert, then down, ...), each released once copied: an
            # arena's pages become resident as they are written, so the layer is never held twice
            for p, size in zip(self.parts, self.sizes, strict=True):
                t = getattr(ly.experts, p).detach()
                for e in range(n):
                    rows[e][off : off + size].copy_(t[e].reshape(-1))
                off += size
                if release:
                    setattr(ly.experts, p, nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False))
                del t
            for e in range(n):
                self.buffers[(ly.index, e)] = rows[e]
        if low_bits:
            self.ensure_low(low_bits, bool(ex.is_transposed), pin)

    def _arena(self, layer: int, n: int, pinned: int) -> tuple[list[torch.Tensor], int]:
        """One layer's rows: `pinned` of them page-locked (if the system allows), the rest pageable."""
        chunks: list[torch.Tensor] = []
        if pinned > 0 and self.pin_error is None:
            try:
                chunks.append(torch.empty(pinned, self.numel, dtype=self.dtype, pin_memory=True))
            except RuntimeError as exc:  # the system refused to lock more memory: pageable from here on
                self.pin_error = str(exc).splitlines()[0]
        got = len(chunks[0]) if chunks else 0
        if got < n:
            chunks.append(torch.empty(n - got, self.numel, dtype=self.dtype))
        self._chunks[layer] = chunks
        self.pinned_bytes += got * self.expert_bytes
        self.pageable_bytes += (n - got) * self.expert_bytes
        self.pinned.update((layer, e) for e in range(got))
        return [row for c in chunks for row in c], got

    @property
    def pinned_fraction(self) -> float:
        total = self.pinned_bytes + self.pageable_bytes
        return self.pinned_bytes / total if total else 1.0

    def ensure_low(self, bits: int, transposed: bool, pin: bool) -> None:
        """Quantised copies of every expert at `bits` (kept until another width is asked for)."""
        if self.quantizer is not None and self.quantizer.bits == bits:
            return
        self.quantizer = Quantizer(self.shapes, self.dtype, bits, transposed)
        self.low = {key: self.quantizer.quantize(self.views(buf), pin=pin) for key, buf in self.buffers.items()}

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        out, off = [], 0
        for shape, n in zip(self.shapes, self.sizes, strict=True):
            out.append(buf[off : off + n].view(shape))
            off += n
        return out

    def columns(self, layer: int, part: str, start: int, stop: int) -> torch.Tensor:
        """Values [start, stop) of part `part` (flattened) of every expert of `layer`: experts x values."""
        i = self.parts.index(part)
        off = sum(self.sizes[:i])
        stop = min(stop, self.sizes[i])
        keys = sorted(k for k in self.buffers if k[0] == layer)
        return torch.stack([self.buffers[k][off + start : off + stop] for k in keys])

    def restore(self, layers: list[MoELayer]) -> None:
        """Put every layer's 3D expert parameters back on the device they came from, one layer at a
        time (the layer's arena is freed before the next is rebuilt); the store is empty after."""
        for ly in layers:
            ex = ly.experts
            n = int(ex.num_experts)
            per_expert = [self.views(self.buffers[(ly.index, e)]) for e in range(n)]
            dev = self.origin.get(ly.index, torch.device("cpu"))
            for i, p in enumerate(self.parts):
                full = torch.stack([views[i] for views in per_expert]).to(dev)
                setattr(ex, p, nn.Parameter(full, requires_grad=False))
            del per_expert
            for e in range(n):
                key = (ly.index, e)
                self.buffers.pop(key, None)
                self.low.pop(key, None)
                self.pinned.discard(key)
            self._chunks.pop(ly.index, None)
        self.pinned_bytes = self.pageable_bytes = 0

    def describe(self) -> dict[str, Any]:
        """For the trace header and the run's report: how the slow tier is held."""
        return {"pinned_bytes": self.pinned_bytes, "pageable_bytes": self.pageable_bytes,
                "pinned_fraction": self.pinned_fraction, **({"pin_error": self.pin_error} if self.pin_error else {})}


def attached_store(model: nn.Module) -> ExpertStore | None:
    """The slow tier that holds this model's experts, if they were offloaded for good (by the loader)."""
    return model.__dict__.get(_ATTR)


def attach_store(model: nn.Module, store: ExpertStore | None) -> None:
    if store is None:
        model.__dict__.pop(_ATTR, None)
    else:
        model.__dict__[_ATTR] = store


class SlotPool:
    """The fast tier: `capacity` expert slots allocated once on the device. Every slot is full-size
    whatever variant it holds (`variant`); with low-precision copies each slot also has a staging
    buffer that the quantised bytes land in before they are dequantised into the slot."""

    def __init__(self, capacity: int, store: ExpertStore, device: torch.device):
        self.buf = torch.empty(capacity, store.numel, dtype=store.dtype, device=device)
        self.views = [store.views(self.buf[i]) for i in range(capacity)]
        self.variant: list[str] = ["full"] * capacity
        q = store.quantizer
        self.stage = torch.empty(capacity, q.nbytes, dtype=torch.uint8, device=device) if q is not None else None
        self.free = list(range(capacity - 1, -1, -1))
        self.slot_of: dict[Key, int] = {}
        self.last_reader: dict[int, Any] = {}  # slot -> CUDA event after the last compute that read it

    def assign(self, key: Key, victim: Key | None) -> int:
        slot = self.slot_of.pop(victim) if victim is not None else self.free.pop()
        self.slot_of[key] = slot
        return slot
