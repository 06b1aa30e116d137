"""The deterministic cost model a policy may weigh (never a clock: decisions must be identical in the
simulator and the runtime). Engines derive it from a hardware profile at `reset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ComputeCost:
    """t(n) = fixed_s + max(floor_s, per_token_s * n) for a batch of n token rows, or, when measured
    `points` (n, seconds) are given, the piecewise-linear curve through them.

    `floor_s` is the memory-bound part (reading the weights once), `per_token_s` the compute-bound
    slope: a roofline has this shape. Measured costs are rarely a line (a decode step against a KV
    cache is its own regime, small batches are overhead), hence the points: between two of them the
    cost is interpolated, past the last one extrapolated along the last segment, below the first one
    it is the first point's.
    """

    fixed_s: float = 0.0
    per_token_s: float = 0.0
    floor_s: float = 0.0
    points: tuple[tuple[int, float], ...] = ()

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        pts = self.points
        if not pts:
            return self.fixed_s + max(self.floor_s, self.per_token_s * n)
        if n <= pts[0][0] or len(pts) == 1:
            return pts[0][1] if n <= pts[0][0] else pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return max(t1 + (t1 - t0) * (n - n1) / (n1 - n0), 0.0)


@dataclass(frozen=True, slots=True)
class HostCost:
    """What the host thread (the Python that drives the model) spends, in seconds, on its own
    timeline: the simulator's `host` process pays these while the compute stream runs what it has
    been given (DESIGN section 5). Measured by `runtime.calibrate`; a profile without them has no
    host timeline and replays as before it existed.

    `queue_depth` is how many kernels the compute stream may hold that have not finished when a
    launch returns: 0 is a synchronous device (the CPU: the host computes each kernel itself), a
    CUDA stream holds about a thousand. The host also waits where the runtime synchronises: when it
    reads a layer's routing back before planning (`sync_routing`; a runtime that routes on the
    device without reading back would not) and at the end of every step.
    """

    queue_depth: int = 1024
    sync_routing: bool = True  # the host reads each layer's routing back before it plans (a device sync)
    step_s: float = 0.0  # once per forward step: the framework, the LM head's launch, sampling
    layer: ComputeCost = ComputeCost()  # per MoE layer call, by token rows: launching its dense part
    dense_layer_s: float = 0.0  # per decoder layer without experts: launching it
    plan: ComputeCost = ComputeCost()  # per layer call, by token rows: the policy's planning, its signals, the bookkeeping
    plans: tuple[tuple[str, ComputeCost], ...] = ()  # (policy spec, plan) measured with that policy
    copy_s: float = 0.0  # per copy: planning the load, handing it to the link (before the copy can start)
    expert: ComputeCost = ComputeCost()  # per GPU expert, by its token rows: its rows, its kernels' launches

    def plan_for(self, spec: str) -> ComputeCost:
        """The planning cost of policy `spec`: its own measurement, else that of the same policy
        name with other parameters, else `plan`."""
        for s, v in self.plans:
            if s == spec:
                return v
        name = spec.split("(")[0]
        for s, v in self.plans:
            if s.split("(")[0] == name:
                return v
        return self.plan


@dataclass(frozen=True, slots=True)
class CostModel:
    h2d_latency_s: float
    h2d_bytes_per_s: float
    variant_bytes: dict[str, int]  # bytes of one expert per variant ("full", "low", ...)
    dense: ComputeCost  # the non-expert part of one decoder layer
    gpu_expert: ComputeCost
    cpu_expert: ComputeCost
    step: ComputeCost = ComputeCost()  # once per forward step: embeddings, LM head, sampling, framework
    host: HostCost | None = None  # the host's own timeline; None: the compute stream alone (as before it existed)
    dense_per_key_s: float = 0.0  # attention's cost per (token row x position it attends to), on top of `dense`

    def transfer_s(self, variant: str = "full") -> float:
        return self.h2d_latency_s + self.variant_bytes[variant] / self.h2d_bytes_per_s

    def gpu_expert_s(self, tokens: int) -> float:
        return self.gpu_expert(tokens)

    def cpu_expert_s(self, tokens: int) -> float:
        return self.cpu_expert(tokens)

    def dense_s(self, tokens: int, keys: int = 0) -> float:
        """The non-expert part of one decoder layer for `tokens` rows that attend to `keys`
        positions in all (a decode row at context length L attends to L + 1, itself included)."""
        if keys and self.dense_per_key_s:
            return self.dense(tokens) + self.dense_per_key_s * keys
        return self.dense(tokens)


# bits per weight of the dtypes a trace header names (`ModelSpec.dtype`); others count as 16
DTYPE_BITS = {"fp64": 64, "fp32": 32, "float32": 32, "tf32": 32, "bf16": 16, "bfloat16": 16, "fp16": 16, "float16": 16,
              "fp8": 8, "int8": 8, "int4": 4}


def dtype_bits(dtype: str) -> int:
    return DTYPE_BITS.get(dtype.lower(), 16)


def variant_bits(model: Any, policy: object | None = None) -> dict[str, int]:
    """Low-precision variants a policy loads, name -> bits per weight: what its `variants(model)`
    declares, or, for a composed policy (`hobbit+lookahead`), what the policies it wraps declare."""
    out: dict[str, int] = {}
    seen = 0
    while policy is not None and seen < 16:
        variants = getattr(policy, "variants", None)
        if callable(variants):
            out.update({k: v for k, v in variants(model).items() if k not in out})
        policy = getattr(policy, "_base", None)  # a modifier's wrapped policy
        seen += 1
    return out


def variant_bytes(model: Any, policy: object | None = None) -> dict[str, int]:
    """Bytes of one expert per variant, the one definition both engines use (the simulator's
    `CostModel` and the runtime's, hence `bytes_h2d` in both): `full` is the header's
    `expert_bytes`; a policy that loads low-precision copies declares them (`variant_bits`), and
    such a copy counts `expert_bytes x bits / dtype bits` (bits/16 for bf16 experts, bits/32 for
    the fp32 tiny models). The nominal size: the quantisation scales the runtime also moves (a
    float16 scale per 64 weights at 4 bits, 1/16 more; per output channel at 8 bits) are not counted."""
    out = {"full": int(model.expert_bytes)}
    full_bits = dtype_bits(model.dtype)
    for name, bits in variant_bits(model, policy).items():
        out[name] = int(model.expert_bytes) * int(bits) // full_bits
    return out
