"""Memory accounting: what a run needs on the device and on the host, checked before anything is
loaded, and what it used afterwards.

The device holds the dense weights (everything but the routed experts), the expert slots and a
reserve for the KV cache and the activations of the largest forward of the run; the host holds
every routed expert (the slow tier). `plan_memory` computes each from the model's spec (read off a
meta-device model built from the config: no weight is read) and the run's sizes, and `MemoryPlan.check`
refuses, in one line with the numbers, a run that cannot fit, before the first byte is loaded.

The reserve is an estimate, on the safe side for the attention implementations transformers uses:
- KV cache: 2 (keys, values) x layers x batch x positions x the cached key and value widths x dtype bytes;
- activations of one forward of `batch x tokens` rows: the logits (dtype, plus a float32 copy when
  the run scores them), the hidden states (8 live copies), the experts' intermediate
  (`2 x moe_intermediate_size`) for every routed row, and one layer's attention scores if the eager
  attention materialises them;
- a fixed margin of 256 MiB for the allocator's rounding, cuBLAS workspaces and the like.
On CUDA the device's budget is its total memory times the per-process fraction
(`torch.cuda.set_per_process_memory_fraction`), and no more than what is free now plus what this
process's allocator already holds. The CUDA context itself lives outside both and is not counted.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from traces.schema import ModelSpec

GIB = 2**30
MARGIN_BYTES = 256 * 2**20


class MemoryError_(ValueError):
    """A run that does not fit; the message is one line with the numbers."""


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def kv_bytes_per_position(config: Any, dtype_bytes: int) -> int:
    """Bytes one position of one sequence adds to the KV cache, over all layers."""
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    if getattr(config, "qk_rope_head_dim", None) is not None and getattr(config, "v_head_dim", None) is not None:
        # multi-head latent attention as transformers caches it: decompressed keys and values per head
        k = heads * (int(getattr(config, "qk_nope_head_dim", 0) or 0) + int(config.qk_rope_head_dim))
        v = heads * int(config.v_head_dim)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        k = v = kv_heads * int(head_dim)
    return int(config.num_hidden_layers) * (k + v) * dtype_bytes


def device_budget(device: torch.device) -> tuple[int, str]:
    """(bytes this process may allocate on `device`, how that was found). The host's available
    memory for the CPU device."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(idx).total_memory
        frac = torch.cuda.get_per_process_memory_fraction(idx)
        free, _ = torch.cuda.mem_get_info(idx)
        held = torch.cuda.memory_reserved(idx)
        budget = min(int(total * frac), free + held)
        how = f"{torch.cuda.get_device_name(idx)}: {_gib(total)}"
        if frac < 1.0:
            how += f" x per-process fraction {frac:g}"
        if budget < int(total * frac):
            how += f", {_gib(free)} free"
        return budget, how
    avail = host_available_bytes()
    return avail, f"host memory: {_gib(avail)} available"


def host_total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_total_bytes()


def release_freed_memory() -> None:
    """Hand the C allocator's freed pages back to the system (glibc `malloc_trim`; elsewhere nothing):
    after loading, transformers' conversion buffers are freed but kept by malloc otherwise."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryPlan(BaseModel):
    """What a run needs (bytes) and what the device and host have."""

    model_config = ConfigDict(extra="forbid")
    device: str
    dtype: str
    dense_bytes: int
    expert_bytes: int  # one routed expert
    experts: int  # routed experts in all (the slow tier holds them all)
    slots: int
    kv_bytes: int
    activation_bytes: int
    margin_bytes: int = MARGIN_BYTES
    budget_bytes: int
    budget_source: str
    min_slots: int  # the smallest cache the policy can run with

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def reserve_bytes(self) -> int:
        return self.kv_bytes + self.activation_bytes + self.margin_bytes

    @property
    def host_tier_bytes(self) -> int:
        return self.experts * self.expert_bytes

    @property
    def need_bytes(self) -> int:
        """On the device: dense + slots + reserve (on the CPU device, the slow tier too: it is the same memory)."""
        need = self.dense_bytes + self.slot_bytes + self.reserve_bytes
        return need + (self.host_tier_bytes if self.device == "cpu" else 0)

    def max_slots(self) -> int:
        spare = self.budget_bytes - (self.need_bytes - self.slot_bytes)
        return max(spare // self.expert_bytes, 0) if self.expert_bytes else 0

    def summary(self) -> str:
        host = f" + host tier {_gib(self.host_tier_bytes)}" if self.device == "cpu" else ""
        return (f"dense {_gib(self.dense_bytes)} + {self.slots} slots x {self.expert_bytes / 2**20:.1f} MiB = {_gib(self.slot_bytes)}"
                f" + reserve {_gib(self.reserve_bytes)} (KV {_gib(self.kv_bytes)}, activations {_gib(self.activation_bytes)},"
                f" margin {_gib(self.margin_bytes)}){host} = {_gib(self.need_bytes)}")

    def check(self, what: str) -> None:
        """Raise `MemoryError_` (one line, the numbers) if the run cannot fit on its device."""
        if self.need_bytes <= self.budget_bytes:
            return
        fits = self.max_slots()
        if fits < self.min_slots:
            smallest = self.model_copy(update={"slots": self.min_slots})
            raise MemoryError_(
                f"{what} cannot fit on {self.device} even with the smallest cache ({self.min_slots} slots): "
                f"{smallest.summary()} > {_gib(self.budget_bytes)} ({self.budget_source})"
            )
        raise MemoryError_(
            f"{what}: a cache of {self.slots} slots does not fit on {self.device}: {self.summary()} > "
            f"{_gib(self.budget_bytes)} ({self.budget_source}); at most {fits} slots fit"
        )


def plan_memory(spec: ModelSpec, config: Any, device: torch.device, slots: int, *, batch: int = 1, prompt_tokens: int = 1,
                new_tokens: int = 0, score_tokens: int = 0, min_slots: int | None = None,
                attn_implementation: str | None = None) -> MemoryPlan:
    """The memory plan of a run of `batch` sequences of up to `prompt_tokens` tokens plus
    `new_tokens` generated ones, with a scored text of `score_tokens` (0: none), on `device`."""
    es = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}.get(spec.dtype, 4)
    positions = max(prompt_tokens + new_tokens, score_tokens, 1)
    kv = batch * positions * kv_bytes_per_position(config, es)
    rows = batch * max(prompt_tokens, score_tokens, 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    logits = rows * vocab * (es + (4 if score_tokens else 0))
    hidden = 8 * rows * spec.hidden_size * es
    experts = rows * spec.top_k * 2 * spec.moe_intermediate_size * es
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    scores = batch * heads * positions * positions * es if (attn_implementation or "eager") == "eager" else 0
    budget, source = device_budget(device)
    dev = "cpu" if device.type == "cpu" else str(device)
    return MemoryPlan(
        device=dev, dtype=spec.dtype, dense_bytes=spec.dense_bytes, expert_bytes=spec.expert_bytes,
        experts=spec.num_experts * spec.num_moe_layers, slots=slots, kv_bytes=kv,
        activation_bytes=logits + hidden + experts + scores, budget_bytes=budget, budget_source=source,
        min_slots=min_slots if min_slots is not None else spec.top_k,
    )


def device_peak_bytes(device: torch.device) -> int | None:
    """`torch.cuda.max_memory_allocated` on CUDA, None elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
