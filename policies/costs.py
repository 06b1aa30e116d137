"""The deterministic cost model a policy may weigh (never a clock: decisions must be identical in the
simulator and the runtime). Engines derive it from a hardware profile at `reset`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ComputeCost:
    """t(n) = fixed_s + max(floor_s, per_token_s * n) for a batch of n token rows.

    `floor_s` is the memory-bound part (reading the weights once), `per_token_s` the compute-bound
    slope; a roofline and a calibrated linear fit (floor 0) both have this shape.
    """

    fixed_s: float = 0.0
    per_token_s: float = 0.0
    floor_s: float = 0.0

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        return self.fixed_s + max(self.floor_s, self.per_token_s * n)


@dataclass(frozen=True, slots=True)
class CostModel:
    h2d_latency_s: float
    h2d_bytes_per_s: float
    variant_bytes: dict[str, int]  # bytes of one expert per variant ("full", "low", ...)
    dense: ComputeCost  # the non-expert part of one decoder layer
    gpu_expert: ComputeCost
    cpu_expert: ComputeCost
    step: ComputeCost = ComputeCost()  # once per forward step: embeddings, LM head, sampling, framework

    def transfer_s(self, variant: str = "full") -> float:
        return self.h2d_latency_s + self.variant_bytes[variant] / self.h2d_bytes_per_s

    def gpu_expert_s(self, tokens: int) -> float:
        return self.gpu_expert(tokens)

    def cpu_expert_s(self, tokens: int) -> float:
        return self.cpu_expert(tokens)

    def dense_s(self, tokens: int) -> float:
        return self.dense(tokens)
