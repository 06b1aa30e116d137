"""Offloading policies shared by the simulator and the runtime (numpy and pydantic only).

Every module of this package that is not part of the core registers its policies when imported;
all of them are imported here, so a new policy is one new file and nothing else."""

import importlib as _importlib
import pkgutil as _pkgutil

from policies.base import (
    REGISTRY,
    DemandPolicy,
    Future,
    Modifier,
    Policy,
    PolicyLike,
    PolicySpecError,
    as_policy,
    available,
    make_policy,
    names,
    parse_spec,
    register,
)
from policies.cache import CacheError, ExpertCache
from policies.costs import ComputeCost, CostModel
from policies.plan import RULES, Counters, LayerPlan, Load, PlanError, apply_plan, preload
from policies.plugins import GROUP, PluginError, load_plugin, load_plugins
from policies.request import Key, LayerRequest

__all__ = [
    "GROUP", "REGISTRY", "RULES", "PluginError", "PolicyLike", "as_policy", "load_plugin", "load_plugins", "names", "preload", "CacheError", "ComputeCost", "CostModel", "Counters", "DemandPolicy", "ExpertCache", "Future", "Key",
    "LayerPlan", "LayerRequest", "Load", "Modifier", "PlanError", "Policy", "PolicySpecError", "apply_plan", "available",
    "make_policy", "parse_spec", "register",
]

_CORE = {"base", "cache", "costs", "plan", "request", "plugins", "check"}  # not policies
for _m in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    if _m not in _CORE and not _m.startswith("_"):
        _importlib.import_module(f"policies.{_m}")
