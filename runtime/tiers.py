"""The two tiers of an offloaded model: the slow tier (`ExpertStore`, every routed expert in host
memory) and the fast tier (`SlotPool`, a fixed number of expert slots on the device)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from policies import Key
from runtime.introspect import MoELayer, OffloadError, _expert_parts
from runtime.quant import Quantizer


class ExpertStore:
    """The slow tier: every routed expert's weights in one contiguous CPU buffer (pinned for CUDA),
    and, for a policy that loads low-precision copies (`low_bits`), each expert quantised as well
    (`low`: one byte buffer per expert, see `runtime.quant`)."""

    def __init__(self, layers: list[MoELayer], pin: bool, low_bits: int | None = None):
        ex = layers[0].experts
        self.parts = _expert_parts(ex)
        self.shapes = [tuple(getattr(ex, p).shape[1:]) for p in self.parts]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.dtype = getattr(ex, self.parts[0]).dtype
        self.buffers: dict[Key, torch.Tensor] = {}
        self.low: dict[Key, torch.Tensor] = {}
        self.quantizer = Quantizer(self.shapes, self.dtype, low_bits, bool(ex.is_transposed)) if low_bits else None
        for ly in layers:
            if [tuple(getattr(ly.experts, p).shape[1:]) for p in self.parts] != self.shapes:
                raise OffloadError(f"experts of {ly.name} differ in shape from the first MoE layer's: slots must be uniform")
            tensors = [getattr(ly.experts, p).detach() for p in self.parts]
            for e in range(int(ly.experts.num_experts)):
                buf = torch.empty(self.numel, dtype=self.dtype, pin_memory=pin)
                off = 0
                for t, n in zip(tensors, self.sizes, strict=True):
                    buf[off : off + n].copy_(t[e].reshape(-1))
                    off += n
                self.buffers[(ly.index, e)] = buf
                if self.quantizer is not None:
                    self.low[(ly.index, e)] = self.quantizer.quantize(self.views(buf), pin=pin)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        out, off = [], 0
        for shape, n in zip(self.shapes, self.sizes, strict=True):
            out.append(buf[off : off + n].view(shape))
            off += n
        return out


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

