"""Offloading policies shared by the simulator and the runtime (numpy and pydantic only)."""

from policies import belady, fifo, lfu, lru, rand, static  # noqa: F401  (register the policies)
from policies.base import (
    REGISTRY,
    DemandPolicy,
    Future,
    Policy,
    PolicySpecError,
    available,
    make_policy,
    parse_spec,
    register,
)
from policies.cache import CacheError, ExpertCache
from policies.costs import ComputeCost, CostModel
from policies.plan import Counters, LayerPlan, Load, PlanError, apply_plan
from policies.request import Key, LayerRequest

__all__ = [
    "REGISTRY", "CacheError", "ComputeCost", "CostModel", "Counters", "DemandPolicy", "ExpertCache", "Future", "Key",
    "LayerPlan", "LayerRequest", "Load", "PlanError", "Policy", "PolicySpecError", "apply_plan", "available",
    "make_policy", "parse_spec", "register",
]
