"""Cache sizes (pydantic), one definition for both engines: `--cache-experts`, `--cache-per-layer` or
`--cache-gb` mean the same slots in a replay and in a real run, and sizes no cache can hold are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies import CacheError, ExpertCache
from traces.schema import ModelSpec

GIB = 2**30  # cache sizes are memory sizes: binary, what vendors call GB


class CacheConfig(BaseModel):
    """Exactly one size: `experts` (total slots), `per_layer` (slots per MoE layer) or `gb`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: int | None = Field(None, ge=1)
    per_layer: int | None = Field(None, ge=1)
    gb: float | None = Field(None, gt=0, allow_inf_nan=False, description="GiB (2**30 bytes)")
    partition: Literal["global", "per_layer"] | None = None

    @model_validator(mode="after")
    def _one_size(self) -> CacheConfig:
        given = [n for n in ("experts", "per_layer", "gb") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one cache size: --cache-experts N, --cache-per-layer K or --cache-gb X")
        if self.per_layer is not None and self.partition == "global":
            raise ValueError("--cache-per-layer implies --partition per_layer")
        return self

    @property
    def resolved_partition(self) -> str:
        if self.per_layer is not None:
            return "per_layer"
        return self.partition or "global"

    def slots(self, model: ModelSpec) -> int:
        if self.experts is not None:
            return self.experts
        if self.per_layer is not None:
            return self.per_layer * model.num_moe_layers
        assert self.gb is not None
        return int(self.gb * GIB // model.expert_bytes)

    def build(self, model: ModelSpec) -> ExpertCache:
        """The empty cache, refusing sizes that cannot hold one token's experts."""
        slots = self.slots(model)
        part = self.resolved_partition
        if slots < 1:
            raise CacheError(
                f"a cache of {self.gb} GiB holds no {model.name} expert ({model.expert_bytes / GIB:.3f} GiB each)"
            )
        cache = ExpertCache(slots, model.num_moe_layers, part)  # type: ignore[arg-type]
        if cache.min_capacity() < model.top_k:
            where = "per layer " if part == "per_layer" else ""
            raise CacheError(
                f"cache too small: {cache.min_capacity()} slot(s) {where}< top_k={model.top_k}; "
                f"every token needs its {model.top_k} experts resident at once"
            )
        return cache

    def describe(self, model: ModelSpec) -> str:
        slots = self.slots(model)
        gib = slots * model.expert_bytes / GIB
        if self.resolved_partition == "per_layer":
            per = slots / model.num_moe_layers
            per_s = f"{per:g}" if per == int(per) else f"{per:.2f} (uneven)"
            return f"{slots} experts ({gib:.2f} GiB), per layer: {per_s}"
        return f"{slots} experts ({gib:.2f} GiB), global"
