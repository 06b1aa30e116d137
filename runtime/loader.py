"""Opening a model for an offloaded run, memory first: the run's memory is planned from the config
alone (a meta-device model: no weight read), refused in one line if it cannot fit, and only then is
the checkpoint loaded, with its routed experts going into the host tier and the rest to the device.
The CLIs (`runtime.run`, `record`, `calibrate`, `validate`) all open their model here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lab.cache import CacheConfig
from runtime.introspect import find_moe_layers, model_spec
from runtime.memory import (
    GIB,
    MemoryError_,
    MemoryPlan,
    device_peak_bytes,
    host_total_bytes,
    peak_host_rss_bytes,
    plan_memory,
)
from runtime.models import (
    SMALL,
    TINY,
    ModelError,
    default_dtype,
    load_model,
    parse_dtype,
    read_config,
    resolve,
)
from traces.schema import ModelSpec


def check_device(device: str) -> torch.device:
    """`--device`: cpu, cuda or cuda:N, refused in one line if this torch cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ModelError(f"--device {device}: {why} (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ModelError(f"--device {device}: the runtime runs on cpu or cuda")
    return dev


def check_pin(pin_gb: float | None) -> int | None:
    """`--pin-gb` in bytes, refused if it is negative or more than the host has."""
    if pin_gb is None:
        return None
    if not pin_gb >= 0:  # also NaN
        raise ModelError(f"--pin-gb must be >= 0, got {pin_gb}")
    total = host_total_bytes()
    if total and pin_gb * GIB > total:
        raise ModelError(f"--pin-gb {pin_gb:g} is more than this host's memory ({total / GIB:.1f} GiB)")
    return int(pin_gb * GIB)


def skeleton(name: str, dtype: torch.dtype | None) -> tuple[nn.Module, ModelSpec, Any]:
    """(a model without weights, its spec, its config): a meta-device model from the checkpoint's
    config, or for a built tiny or small model the model itself (it is small)."""
    name, path = resolve(name)
    if path is None:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = (TINY.get(name) or SMALL[name])()
        if dtype is not None:
            model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        config = read_config(path)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(path, config))
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{path}: cannot build the model from its config: {str(exc).splitlines()[0]}") from None
    model.config.name_or_path = name
    layers = find_moe_layers(model)
    spec = model_spec(model, layers, name) if layers else None
    return model, spec, model.config  # type: ignore[return-value]


@dataclass
class Opened:
    model: nn.Module
    name: str
    plan: MemoryPlan | None  # None for a model without MoE layers
    device: torch.device
    cache_per_layer: int | None = None  # as asked, or what fits (`open_model(shrink_to_fit=True)`)

    def memory_report(self) -> dict[str, Any]:
        """Peak host RSS and (CUDA) peak allocated device memory so far, with the plan's figures."""
        out: dict[str, Any] = {"peak_host_rss_bytes": peak_host_rss_bytes(), "peak_device_allocated_bytes": device_peak_bytes(self.device)}
        if self.plan is not None:
            out.update({"planned_dense_bytes": self.plan.dense_bytes, "planned_slot_bytes": self.plan.slot_bytes,
                        "planned_reserve_bytes": self.plan.reserve_bytes, "device_budget_bytes": self.plan.budget_bytes})
        from runtime.tiers import attached_store

        store = attached_store(self.model)
        if store is not None:
            out.update({"host_tier_" + k: v for k, v in store.describe().items()})
        return out


def open_model(name: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu", pin_gb: float | None = None,
               cache_experts: int | None = None, cache_per_layer: int | None = None, cache_gb: float | None = None, batch: int = 1, prompts: list[str] | None = None, new_tokens: int = 0,
               score_text: str | None = None, shrink_to_fit: bool = False) -> Opened:
    """Plan, check, then load `name` with its experts in the host tier (see the module docstring).
    `cache_experts` / `cache_per_layer` / `cache_gb`: the cache the run will allocate, as
    `lab.cache.CacheConfig` sizes it (a size no cache can hold is a CacheError here; neither: the smallest the
    runtime accepts, top_k slots, which a policy that keeps every expert replaces); `prompts`
    (run `batch` at a time, each followed by `new_tokens` generated ones) and `score_text` (scored
    in one forward) size the KV cache and activation reserve, tokenized as the run will.
    `shrink_to_fit`: a per-layer cache that does not fit becomes the largest that does (calibration,
    which wants every expert resident, measures with what the device holds)."""
    from runtime.record import encode

    dt = parse_dtype(dtype)
    dev = check_device(device)
    pin_bytes = check_pin(pin_gb)
    sk, spec, config = skeleton(name, dt)
    plan = None
    if spec is not None:
        prompt_tokens = max((int(encode(sk, name, p).shape[1]) for p in prompts or []), default=1)
        score_tokens = int(encode(sk, name, score_text).shape[1]) if score_text else 0
        n = spec.num_moe_layers
        min_slots = spec.top_k * n if cache_per_layer is not None else spec.top_k
        given = {k: v for k, v in (("experts", cache_experts), ("per_layer", cache_per_layer), ("gb", cache_gb)) if v is not None}
        slots = CacheConfig(**given).build(spec).capacity if given else min_slots  # the sizes the simulator means
        plan = plan_memory(spec, config, dev, slots, batch=batch,
                           prompt_tokens=prompt_tokens, new_tokens=new_tokens, score_tokens=score_tokens, min_slots=min_slots,
                           attn_implementation=getattr(config, "_attn_implementation", None))
        if shrink_to_fit and cache_per_layer is not None and plan.need_bytes > plan.budget_bytes:
            cache_per_layer = max(min(cache_per_layer, plan.max_slots() // n), spec.top_k)
            plan = plan.model_copy(update={"slots": cache_per_layer * n})
        plan.check(name)
    del sk
    try:
        model, name = load_model(name, dtype=dt, device=dev, experts="host", pin_bytes=pin_bytes)
    except torch.OutOfMemoryError as exc:  # nothing half-loaded stays on the device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        raise MemoryError_(f"{name}: out of device memory while loading: {str(exc).splitlines()[0]}") from None
    return Opened(model, name, plan, dev, cache_per_layer)
