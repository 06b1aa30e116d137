"""Hardware profiles: the PCIe link, the GPU, the host CPU, and how long the model's parts take on them.

A profile is a JSON file validated by `HardwareProfile`. Presets (`lab/profiles/*.json`) are derived
from datasheet figures with stated efficiency factors and are marked `source: "datasheet"`;
`python -m runtime.calibrate` writes `source: "calibrated"` profiles whose `fit` holds measured
costs for one model, which then replace the roofline for that model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from policies.costs import ComputeCost, CostModel, HostCost
from traces.schema import ModelSpec

PROFILE_DIR = Path(__file__).parent / "profiles"
GB = 1e9  # bandwidths are decimal (GB/s), as datasheets give them
GIB = 2**30  # memory sizes are binary: a "24 GB" card holds 24 GiB
# A copy from pageable host memory goes through the driver's page-locked staging buffer: a host
# memcpy, then the DMA, chunk by chunk, and it does not overlap the caller. Measured pageable
# cudaMemcpy rates are commonly half the pinned rate or less on PCIe 4/5 hosts (NVIDIA's "How to
# Optimize Data Transfers in CUDA C/C++" shows the gap; it depends on the host's memcpy bandwidth):
# 0.5 is the datasheet assumption, replaced by a measurement in a calibrated profile
# (`runtime.calibrate` on CUDA measures both).
PAGEABLE_FACTOR = 0.5


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
    pageable_gbps: float | None = Field(None, gt=0, description="achieved H2D bandwidth from pageable host memory; "
                                        "default: h2d_gbps x PAGEABLE_FACTOR (0.5)")
    pinned_fraction: float | None = Field(None, ge=0, le=1, description="share of the slow tier's bytes that are "
                                          "page-locked (the runtime's --pin-gb cap); default: 1 if pinned else 0")

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The pageable fields only when set: a profile without them dumps as it did before they existed."""
        out = handler(self)
        for k in ("pageable_gbps", "pinned_fraction"):
            if out.get(k) is None:
                out.pop(k, None)
        return out

    def effective_h2d_gbps(self) -> float:
        """The bandwidth an average expert copy sees: pinned bytes at `h2d_gbps`, pageable ones at
        `pageable_gbps` (time-weighted, i.e. the harmonic mix by the pinned share of the bytes)."""
        f = self.pinned_fraction if self.pinned_fraction is not None else (1.0 if self.pinned else 0.0)
        if f >= 1.0:
            return self.h2d_gbps
        slow = self.pageable_gbps if self.pageable_gbps is not None else self.h2d_gbps * PAGEABLE_FACTOR
        return 1.0 / (f / self.h2d_gbps + (1.0 - f) / slow)


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
    dense_per_key_s: float | None = Field(
        None, ge=0, description="attention's cost per token row and position it attends to, on top of `dense` "
        "(which then holds the cost at no context): decode at context L pays it L + 1 times per row")

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("dense_per_key_s") is None:
            out.pop("dense_per_key_s", None)
        return out


class HostProfile(_Strict):
    """The host thread's own costs, in seconds: the Python that drives the model (DESIGN section 5).
    The simulator runs them on a `host` timeline of their own (`sim.host`): the thread plans each
    layer call, hands its copies to the link and launches its kernels, and the compute stream runs
    what has been launched. A profile without this block has no host timeline: the compute stream
    is driven directly and every host cost is whatever the `fit` folded into the compute."""

    queue_depth: int = Field(1024, ge=0, description="launched kernels the compute stream may hold unfinished "
                             "when a launch returns; 0: a synchronous device (the CPU), a CUDA stream holds ~1000")
    sync_routing: bool = Field(True, description="the host reads each layer's routing back before it plans (a device sync)")
    step_s: float = Field(0.0, ge=0, description="once per forward step: the framework, the LM head's launch, sampling")
    layer: Cost = Field(default_factory=Cost, description="per MoE layer call, by token rows: launching its dense part")
    dense_layer_s: float = Field(0.0, ge=0, description="per decoder layer without experts: launching it")
    plan: Cost = Field(default_factory=Cost, description="per layer call, by token rows: the policy's planning, the "
                       "signals it reads, the runtime's bookkeeping (any policy without its own entry in `plans`)")
    plans: dict[str, Cost] = Field(default_factory=dict, description="`plan` measured with a given policy (canonical spec)")
    copy_s: float = Field(0.0, ge=0, description="per copy: planning the load, handing it to the link (before it can start)")
    expert: Cost = Field(default_factory=Cost, description="per GPU expert, by its token rows: finding its rows, launching its kernels")
    policy: str | None = Field(None, description="the policy `plan` was measured with")

    def host_cost(self) -> HostCost:
        return HostCost(
            queue_depth=self.queue_depth, sync_routing=self.sync_routing, step_s=self.step_s,
            layer=self.layer.compute_cost(), dense_layer_s=self.dense_layer_s, plan=self.plan.compute_cost(),
            plans=tuple((k, v.compute_cost()) for k, v in sorted(self.plans.items())), copy_s=self.copy_s,
            expert=self.expert.compute_cost(),
        )


class Spread(_Strict):
    """One calibrated quantity's repeated measurements: the median (what the profile uses), the
    quartiles, and how many samples were kept and rejected as outliers."""

    median: float
    q1: float
    q3: float
    n: int = Field(ge=0)
    rejected: int = Field(0, ge=0)

    @property
    def rel_iqr(self) -> float:
        """The interquartile range relative to the median (0 when the median is 0)."""
        return (self.q3 - self.q1) / abs(self.median) if self.median else 0.0


class Calibration(_Strict):
    """How a calibrated profile was measured: repeats, the machine's load around it, the spread of
    every quantity (keyed by where it went in the profile, e.g. `fit.dense@1`, `link.latency_us`)."""

    repeats: int = Field(ge=1)
    loadavg_before: list[float] = Field(default_factory=list, description="os.getloadavg() before (1, 5, 15 min)")
    loadavg_after: list[float] = Field(default_factory=list)
    cpus: int | None = Field(None, description="CPUs this process may run on")
    steal_before: float | None = Field(None, description="share of a spin probe's wall time the CPU was taken away")
    steal_after: float | None = None
    spreads: dict[str, Spread] = Field(default_factory=dict)
    max_rel_iqr: float = Field(0.0, ge=0, description="the largest relative interquartile spread of the quantities that matter")
    threshold: float = Field(0.1, ge=0, description="max_rel_iqr above this: the profile is noisy")
    noisy: bool = False
    warnings: list[str] = Field(default_factory=list)


class HardwareProfile(_Strict):
    name: str
    description: str = ""
    source: Literal["datasheet", "calibrated"]
    references: list[str] = Field(default_factory=list)
    link: LinkProfile
    gpu: GPUProfile
    cpu: CPUProfile
    fit: Fit | None = None
    host: HostProfile | None = None
    calibration: Calibration | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A profile without a host or a calibration record dumps exactly as before those blocks
        existed (the `config.hardware` of a replay's `--out`)."""
        out = handler(self)
        for k in ("host", "calibration"):
            if out.get(k) is None:
                out.pop(k, None)
        return out

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
        bw = self.link.effective_h2d_gbps() * GB / self.link.copy_engines
        step = ComputeCost()
        per_key = 0.0
        if self.fit is not None:
            dense, gpu_e, cpu_e = (c.compute_cost() for c in (self.fit.dense, self.fit.gpu_expert, self.fit.cpu_expert))
            step = self.fit.step.compute_cost()
            per_key = self.fit.dense_per_key_s or 0.0
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
            host=self.host.host_cost() if self.host is not None else None,
            dense_per_key_s=per_key,
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
