"""Hardware profiles: the PCIe link, the GPU, the host CPU, and how long the model's parts take on them.

A profile is a JSON file validated by `HardwareProfile`. Presets (`lab/profiles/*.json`) are derived
from datasheet figures with stated efficiency factors and are marked `source: "datasheet"`;
`python -m runtime.calibrate` writes `source: "calibrated"` profiles whose `fit` holds measured
costs for one model, which then replace the roofline for that model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies.costs import ComputeCost, CostModel
from traces.schema import ModelSpec

PROFILE_DIR = Path(__file__).parent / "profiles"
GB = 1e9  # bandwidths are decimal (GB/s), as datasheets give them
GIB = 2**30  # memory sizes are binary: a "24 GB" card holds 24 GiB


class HardwareError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkProfile(_Strict):
    h2d_gbps: float = Field(gt=0, description="achieved host-to-device bandwidth, GB/s (1e9 B/s)")
    d2h_gbps: float = Field(gt=0, description="achieved device-to-host bandwidth, GB/s")
    latency_us: float = Field(ge=0, description="fixed cost of one transfer (launch, DMA setup)")
    copy_engines: int = Field(1, ge=1, description="concurrent H2D copies; they share h2d_gbps")
    pinned: bool = Field(True, description="slow-tier buffers are page-locked (pageable copies are slower)")
    theoretical_gbps: float | None = Field(None, description="the interface's datasheet rate, for reference")


class GPUProfile(_Strict):
    name: str
    hbm_gib: float = Field(gt=0, description="device memory in GiB (what vendors call GB)")
    reserve_gib: float = Field(1.5, ge=0, description="GiB for KV cache, activations, CUDA context (dense weights are added)")
    peak_tflops: float = Field(gt=0, description="dense bf16 tensor-core peak")
    hbm_gbps: float = Field(gt=0)
    flops_efficiency: float = Field(0.6, gt=0, le=1)
    hbm_efficiency: float = Field(0.8, gt=0, le=1)
    expert_overhead_us: float = Field(10.0, ge=0, description="fixed cost of running one expert (kernel launches)")
    dense_overhead_us: float = Field(40.0, ge=0, description="fixed cost of the non-expert part of one layer")


class CPUProfile(_Strict):
    name: str
    peak_gflops: float = Field(gt=0, description="fp32 vector peak of all cores")
    mem_gbps: float = Field(gt=0, description="DRAM bandwidth")
    dram_gib: float = Field(gt=0, description="host memory in GiB")
    flops_efficiency: float = Field(0.5, gt=0, le=1)
    mem_efficiency: float = Field(0.7, gt=0, le=1)
    expert_overhead_us: float = Field(50.0, ge=0)


class Cost(_Strict):
    """t(n) = fixed_s + max(floor_s, per_token_s * n) seconds for n token rows; or, if `points` are
    given (measured (n, seconds), ascending n), the piecewise-linear curve through them."""

    fixed_s: float = Field(0.0, ge=0)
    per_token_s: float = Field(0.0, ge=0)
    floor_s: float = Field(0.0, ge=0)
    points: list[tuple[int, float]] = Field(default_factory=list)

    @field_validator("points")
    @classmethod
    def _ascending(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        if any(n < 1 or t < 0 for n, t in v):
            raise ValueError("points: token counts must be >= 1 and times >= 0")
        if any(b[0] <= a[0] for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("points: token counts must be strictly ascending")
        return v

    def compute_cost(self) -> ComputeCost:
        return ComputeCost(self.fixed_s, self.per_token_s, self.floor_s, tuple((int(n), float(t)) for n, t in self.points))


class Fit(_Strict):
    """Measured costs of one model on this machine (from calibration)."""

    model: str = Field(description="ModelSpec.name the costs were measured on")
    dense: Cost
    gpu_expert: Cost
    cpu_expert: Cost
    step: Cost = Field(default_factory=Cost, description="once per forward step: embeddings, LM head, sampling, framework")


class HardwareProfile(_Strict):
    name: str
    description: str = ""
    source: Literal["datasheet", "calibrated"]
    references: list[str] = Field(default_factory=list)
    link: LinkProfile
    gpu: GPUProfile
    cpu: CPUProfile
    fit: Fit | None = None

    # -- derived ----------------------------------------------------------------------------------
    def expert_budget_bytes(self, model: ModelSpec) -> int:
        """HBM left for the expert cache once dense weights and the reserve are placed."""
        return int(self.gpu.hbm_gib * GIB - self.gpu.reserve_gib * GIB - model.dense_bytes)

    def cost_model(self, model: ModelSpec, variant_bytes: dict[str, int] | None = None) -> CostModel:
        """The deterministic costs both the engines and the policies use (calibrated fit, else roofline)."""
        if self.fit is not None and self.fit.model != model.name:
            raise HardwareError(
                f"hardware profile {self.name!r} was calibrated on model {self.fit.model!r}, the trace is {model.name!r}; "
                "calibrate on this model or use a datasheet profile"
            )
        variants = variant_bytes or {"full": model.expert_bytes}
        bw = self.link.h2d_gbps * GB / self.link.copy_engines
        step = ComputeCost()
        if self.fit is not None:
            dense, gpu_e, cpu_e = (c.compute_cost() for c in (self.fit.dense, self.fit.gpu_expert, self.fit.cpu_expert))
            step = self.fit.step.compute_cost()
        else:
            g, c = self.gpu, self.cpu
            flops = g.peak_tflops * 1e12 * g.flops_efficiency
            hbm = g.hbm_gbps * GB * g.hbm_efficiency
            expert_flops_per_token = 6.0 * model.hidden_size * model.moe_intermediate_size
            dense_layer_bytes = model.dense_bytes / model.num_layers
            dense_flops_per_token = 2.0 * (dense_layer_bytes / 2.0)  # bf16 dense weights: 2 FLOPs per parameter
            gpu_e = ComputeCost(g.expert_overhead_us * 1e-6, expert_flops_per_token / flops, model.expert_bytes / hbm)
            dense = ComputeCost(g.dense_overhead_us * 1e-6, dense_flops_per_token / flops, dense_layer_bytes / hbm)
            cpu_flops = c.peak_gflops * 1e9 * c.flops_efficiency
            dram = c.mem_gbps * GB * c.mem_efficiency
            cpu_e = ComputeCost(c.expert_overhead_us * 1e-6, expert_flops_per_token / cpu_flops, model.expert_bytes / dram)
        return CostModel(
            h2d_latency_s=self.link.latency_us * 1e-6,
            h2d_bytes_per_s=bw,
            variant_bytes=variants,
            dense=dense,
            gpu_expert=gpu_e,
            cpu_expert=cpu_e,
            step=step,
        )


def presets() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> HardwareProfile:
    """A preset by name (`rtx4090`) or a profile JSON file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" or path.exists()):
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise HardwareError(f"unknown hardware {name_or_path!r}; presets: {', '.join(presets())}, or a profile .json file")
    if not path.exists():
        raise HardwareError(f"{path}: no such hardware profile file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HardwareError(f"{path}:{exc.lineno}: bad JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise HardwareError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise HardwareError(f"{path}: cannot read hardware profile: {exc.strerror or exc}") from None
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(x) for x in err["loc"]) or "profile"
        raise HardwareError(f"{path}: {field}: {err['msg']}") from None
