"""HOBBIT (Tang et al., "HOBBIT: A Mixed Precision Expert Offloading System for Fast MoE Inference",
arXiv 2411.01433): a miss that matters little is loaded as a low-precision copy."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from policies import _lossy
from policies.base import Policy, PolicySpecError, register
from policies.cache import ExpertCache
from policies.costs import dtype_bits
from policies.plan import LayerPlan, Load
from policies.request import Key, LayerRequest
from traces.schema import ModelSpec


class HobbitParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: Literal[4, 8] = Field(4, description="bits per weight of the low-precision copy (int4 or int8)")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="a miss whose share of every token's weight is below it loads low; 0: never")
    upgrade: bool = Field(True, description="reload a resident low copy at full precision when a critical token needs it")
    evict: Literal["lru", "lfu"] = Field("lru", description="replacement: least recently or least frequently used")


@register("hobbit")
class Hobbit(Policy):
    """A missing expert whose routing weight is below `threshold` for every token of the call (as
    a share of the token's routed weight) is loaded as the low-precision variant `low` and cached
    as such; a critical one (some token at or above the threshold) loads at full precision.

    Why: the transfer is the cost of a miss, and an expert that contributes little to its tokens'
    outputs tolerates quantisation: an int4 copy of a bf16 expert moves a quarter of the bytes.

    Bytes: a `low` copy counts `expert_bytes x bits / dtype bits` (`policies.costs.variant_bytes`,
    the same in both engines: bits/16 for bf16 experts, bits/32 for the fp32 tiny models). Slots
    stay full-size: the cache holds as many experts as before, only the copies shrink. In the
    runtime the slow tier keeps an int8 (per-output-channel) or int4 (groups of 32) quantised copy
    of every expert and dequantises into the slot on the device.

    Upgrade: a resident `low` expert that a critical token needs is reloaded at full precision
    into its own slot (a load whose victim is the expert itself: no other expert is evicted, it
    counts one miss and `full` bytes); non-critical tokens use a `low` expert as a hit. With
    `upgrade=False` a `low` copy serves every token until it is evicted (fewer bytes, more error).
    Victims by `evict` (HOBBIT's own multidimensional cache policy is not reproduced).
    """

    Params = HobbitParams
    lossless = False

    def variants(self, model: ModelSpec) -> dict[str, int]:
        """Variant name -> bits per weight, read by `policies.costs.variant_bytes`."""
        bits = self.params.bits  # type: ignore[attr-defined]
        full = dtype_bits(model.dtype)
        if bits >= full:
            raise PolicySpecError(f"hobbit(bits={bits}) saves nothing on {model.dtype} experts ({full} bits)")
        return {"low": bits}

    def reset(self, model: ModelSpec, cache, costs, future=None) -> None:  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        self.variants(model)

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return _lossy.victim(self.params.evict, cache, part, exclude)  # type: ignore[attr-defined]

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        p: HobbitParams = self.params  # type: ignore[assignment]
        need = req.keys_in_access_order()
        resident = cache.resident
        if p.threshold <= 0:
            critical = None  # everything critical: full precision, the base policy
        else:
            shares = _lossy.token_shares(req.weights)
            crit = req.topk[shares >= p.threshold]
            critical = {(req.layer, int(e)) for e in crit.tolist()}
        misses = [k for k in need if k not in resident]
        upgrades = [k for k in need if resident.get(k) == "low" and (critical is None or k in critical)] if p.upgrade else []
        if not misses and not upgrades:
            return LayerPlan(execute=need, order=need)
        up = set(upgrades)
        hits = [k for k in need if k in resident and k not in up]
        room = {ld.key: ld for ld in self.make_room(cache, misses, set(need), hits)}
        loads: list[Load] = []
        for k in need:
            if k in up:
                loads.append(Load(k, k, "full"))
            elif k in room:
                ld = room[k]
                if critical is not None and k not in critical:
                    ld.variant = "low"
                loads.append(ld)
        return LayerPlan(execute=need, order=hits + [ld.key for ld in loads], loads=loads)
