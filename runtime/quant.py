"""Low-precision copies of experts for mixed-precision policies (`hobbit`): the slow tier keeps each
expert quantised in one contiguous byte buffer; a `low` load moves those bytes and dequantises them
into the full-size slot on the device.

- int8: symmetric, one float16 scale per output channel (levels -127..127);
- int4: symmetric, one float16 scale per group of 64 input weights of an output channel (levels
  -7..7, stored +8 in a nibble), two weights per byte: 4.25 bits per weight with the scales.

Biases (if any) travel at full precision. Weights are quantised in their `[out, in]` orientation
(transposed experts are turned first), so channels and groups mean the same for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 64  # int4 group size along the input dimension
_ALIGN = 16  # every segment starts at a multiple of this, so it can be viewed as float16 / the weight dtype


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _half(scale: torch.Tensor) -> torch.Tensor:
    """Scales as they are stored (float16), so quantising and dequantising use the same; 0 (an
    all-zero channel or group, or one too small for float16) becomes 1."""
    s = scale.to(torch.float16).float()
    return torch.where(s > 0, s, torch.ones_like(s))


@dataclass(frozen=True)
class _Part:
    shape: tuple[int, ...]  # the part's shape in the slot
    kind: str  # "raw" (bias), "int8" or "int4"
    out: int = 0
    inp: int = 0
    inp_padded: int = 0
    q_off: int = 0
    q_bytes: int = 0
    s_off: int = 0
    s_count: int = 0


class Quantizer:
    """The byte layout of one quantised expert (the same for every expert of the model)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, bits: int, transposed: bool):
        if bits not in (4, 8):
            raise ValueError(f"low-precision copies are int8 or int4, not {bits} bits")
        self.bits, self.dtype, self.transposed = bits, dtype, transposed
        parts: list[_Part] = []
        off = 0
        esize = torch.empty(0, dtype=dtype).element_size()
        for shape in shapes:
            if len(shape) != 2:
                n = 1
                for d in shape:
                    n *= d
                parts.append(_Part(tuple(shape), "raw", q_off=off, q_bytes=n * esize))
                off = _align(off + n * esize)
                continue
            out, inp = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
            if bits == 8:
                q_bytes, s_count, inp_p = out * inp, out, inp
            else:
                g = min(GROUP, inp)
                inp_p = (inp + g - 1) // g * g
                q_bytes, s_count = (out * inp_p + 1) // 2, out * (inp_p // g)
            q_off = off
            s_off = _align(off + q_bytes)
            off = _align(s_off + 2 * s_count)
            parts.append(_Part(tuple(shape), f"int{bits}", out, inp, inp_p, q_off, q_bytes, s_off, s_count))
        self.parts = parts
        self.nbytes = off

    def _group(self, p: _Part) -> int:
        return min(GROUP, p.inp)

    def quantize(self, tensors: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
        """One expert's parts (shapes as in the slot) -> its quantised byte buffer (on the CPU)."""
        buf = torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        for p, t in zip(self.parts, tensors, strict=True):
            if p.kind == "raw":
                buf[p.q_off : p.q_off + p.q_bytes].copy_(t.detach().reshape(-1).contiguous().view(torch.uint8))
                continue
            w = t.detach().float()
            w = w.t() if self.transposed else w  # [out, in]
            if p.kind == "int8":
                scale = _half(w.abs().amax(dim=1) / 127.0)
                q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
                buf[p.q_off : p.q_off + p.q_bytes].copy_(q.reshape(-1).view(torch.uint8))
            else:
                g = self._group(p)
                if p.inp_padded != p.inp:
                    w = torch.nn.functional.pad(w, (0, p.inp_padded - p.inp))
                grouped = w.reshape(p.out, p.inp_padded // g, g)
                scale = _half(grouped.abs().amax(dim=2) / 7.0)
                q = (torch.round(grouped / scale[:, :, None]).clamp(-7, 7) + 8).to(torch.uint8).reshape(-1)
                if q.numel() % 2:
                    q = torch.cat([q, q.new_zeros(1)])
                packed = q[0::2] | (q[1::2] << 4)
                buf[p.q_off : p.q_off + p.q_bytes].copy_(packed)
            buf[p.s_off : p.s_off + 2 * p.s_count].copy_(scale.reshape(-1).to(torch.float16).view(torch.uint8))
        return buf

    def dequantize(self, buf: torch.Tensor, views: list[torch.Tensor]) -> None:
        """A quantised byte buffer (on the device) -> the slot's part views (full dtype), in place."""
        for p, dst in zip(self.parts, views, strict=True):
            if p.kind == "raw":
                dst.copy_(buf[p.q_off : p.q_off + p.q_bytes].view(self.dtype).view(p.shape))
                continue
            scale = buf[p.s_off : p.s_off + 2 * p.s_count].view(torch.float16).float()
            raw = buf[p.q_off : p.q_off + p.q_bytes]
            if p.kind == "int8":
                w = raw.view(torch.int8).view(p.out, p.inp).float() * scale[:, None]
            else:
                g = self._group(p)
                nib = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)[: p.out * p.inp_padded]
                w = (nib.float() - 8.0).view(p.out, p.inp_padded // g, g) * scale.view(p.out, -1, 1)
                w = w.reshape(p.out, p.inp_padded)[:, : p.inp]
            dst.copy_(w.t() if self.transposed else w)
