"""The policy interface, the registry and the spec parser.

A spec string (`lru`, `lfu(decay=0.9)`, `random(seed=1)`, later `lru+lookahead(depth=1)`) names a
registered policy and its parameters. The same string works in every CLI, in sweep files and in
Python, and each policy's parameters are a pydantic model, so a bad parameter gets a clear error.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from policies.cache import ExpertCache
from policies.costs import CostModel
from policies.plan import LayerPlan, Load
from policies.request import Key, LayerRequest
from traces.schema import ModelSpec


class PolicySpecError(ValueError):
    """A spec string that names no policy or gives bad parameters."""


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Future:
    """The accesses still to come, for oracle policies: per layer call, its keys in access order.

    Only the simulator can give this (it has the whole trace); the runtime refuses oracle policies
    unless it replays the very run the trace came from.
    """

    def __init__(self, calls: Sequence[Sequence[Key]]):
        self.calls = calls

    @classmethod
    def from_records(cls, records: Iterable[object]) -> Future:
        """From trace records (layer records; others are skipped)."""
        from traces.schema import LayerRecord

        return cls([
            LayerRequest(r.step, r.phase, r.layer, r.topk, r.weights).keys_in_access_order()
            for r in records
            if isinstance(r, LayerRecord)
        ])

    @classmethod
    def from_trace(cls, path: str | os.PathLike[str], allow_truncated: bool = False) -> Future:
        from traces.io import TraceReader

        return cls.from_records(TraceReader(path, allow_truncated=allow_truncated))

    def counts(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for call in self.calls:
            for k in call:
                out[k] = out.get(k, 0) + 1
        return out


class Policy:
    """Decides, at every MoE layer call, what runs where and what moves.

    Subclasses set `name` (through `@register`), `Params`, and implement `plan`, or, for a plain
    replacement policy, just `victim` (see `DemandPolicy`). A policy never reads a clock and draws
    random numbers only from a generator seeded by its parameters.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    lossless: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False
    wraps: ClassVar[bool] = False  # a modifier that composes after '+'
    # what the policy reads beyond topk/weights: the request fields "probs", "lookahead", "importance",
    # and "expert_similarity", the model spec's weight similarity (a header item, given at `reset`);
    # the runtime computes them only when asked (the simulator takes them from the trace)
    uses: ClassVar[frozenset[str]] = frozenset()
    lookahead_depth: int = 0  # how many later layers a look-ahead policy wants predicted

    def __init__(self, params: BaseModel | None = None, **kwargs: Any):
        self.params = params if params is not None else self.Params(**kwargs)

    @property
    def spec(self) -> str:
        """The canonical spec string: every parameter spelled out, so a result names its policy fully."""
        items = self.params.model_dump()
        if not items:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_fmt(v)}' for k, v in items.items())})"

    def required_fields(self) -> set[str]:
        """Trace fields the policy cannot do without (a replay of a trace lacking one is refused);
        by default everything it `uses`. A policy with a fallback (look-ahead from history) narrows it."""
        return set(self.uses)

    def wants_future(self) -> bool:
        """Whether the engine must pass the future accesses to `reset` (oracles)."""
        return self.needs_future

    def reset(self, model: ModelSpec, cache: ExpertCache, costs: CostModel | None, future: Future | None = None) -> None:
        self.model = model
        self.costs = costs
        self.__dict__.pop("_listeners", None)
        if self.wants_future() and future is None:
            raise PolicySpecError(f"policy {self.name!r} is an oracle: it needs the future accesses (replay a trace)")

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        raise NotImplementedError

    def observe(self, step_end: Any) -> None:
        """Called after every forward step; for policies that learn across steps."""

    def notes(self) -> list[str]:
        """One-line remarks on how the run went that a result should mention (a look-ahead that fell
        back to its history predictor, ...); `sim.replay` prints them after the run."""
        return []

    # -- what the engines tell the policy (libCacheSim-style hooks) ---------------------------------
    # `policies.apply_plan` (both engines) calls these for every change it applies to the cache, in
    # the order it applies them, so a policy that keeps its own queues never drifts from the cache: the
    # evictions of `make_room`'s forced streaming path and a modifier's prefetches included. They are
    # called on each part of a composite that overrides one (`listeners`), after `reset`.
    def on_admit(self, key: Key, variant: str, prefetch: bool) -> None:
        """`key` took a slot (an urgent load, or a prefetch), as `variant`; its copy may still be in flight."""

    def on_evict(self, key: Key) -> None:
        """`key` left its slot (before the key that replaces it is admitted; a new variant of a resident
        key is an eviction of the old copy, then an admission)."""

    def on_access(self, key: Key, hit: bool) -> None:
        """The call ran `key` on the GPU, after the plan's loads; `hit`: it was resident (or in flight)
        before the call. Called in access order, once per distinct expert of the call (experts the plan
        runs on the CPU are no cache access and are not reported)."""

    def listeners(self) -> tuple[Policy, ...]:
        """The parts of this policy (itself, and a modifier's base, recursively) that override a hook:
        what `apply_plan` tells every change to."""
        got = self.__dict__.get("_listeners")
        if got is None:
            parts: list[Policy] = []
            p: Policy | None = self
            while p is not None:
                if _hooked(type(p)):
                    parts.append(p)
                p = p.__dict__.get("_base")
            got = self._listeners = tuple(parts)
        return got

    # -- shared planning helpers --------------------------------------------------------------------
    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        """This policy's eviction choice among the partition's resident keys outside `exclude`
        (never based on whether a copy is still in flight: that is timing)."""
        raise NotImplementedError

    def make_room(
        self,
        cache: ExpertCache,
        keys: Iterable[Key],
        protect: set[Key],
        runs_before: Sequence[Key] = (),
        force: bool = True,
        after: Sequence[Load] = (),
    ) -> list[Load]:
        """Loads for `keys` (in order), each with a free slot or a victim.

        Victims come from this policy's `victim` among keys the current call does not use
        (`protect`); failing that, and only when `force`, from keys this call uses that run *before*
        the load in execution order (`runs_before` plus earlier loads), so a call that needs more
        experts than the cache holds streams them through the slots instead of deadlocking.

        `after` are loads this plan already makes (a prefetch planned after the urgent loads): their
        slots and victims are spoken for.

        Whether a copy is still in flight is timing, which differs between the simulator and the
        runtime; so no choice here looks at it (evicting a key in flight is allowed: the engine's copy
        into its slot waits for the copy out of it), and both engines decide the same.
        """
        loads: list[Load] = []
        free: dict[int, int] = {}
        taken: set[Key] | None = None  # protected keys and victims chosen so far, built on the first eviction
        chosen: set[Key] = set()
        glob = cache.partition == "global"
        if after:
            taken = set(protect) | {ld.key for ld in after} | {ld.victim for ld in after if ld.victim is not None}
            for ld in after:
                if ld.victim is None:
                    part = 0 if glob else ld.key[0]
                    free[part] = free.get(part, cache.free[part]) - 1
        for key in keys:
            part = 0 if glob else key[0]
            f = free.get(part)
            if f is None:
                f = cache.free[part]
            if f > 0:
                free[part] = f - 1
                loads.append(Load(key))
                continue
            free[part] = 0
            if taken is None:
                taken = set(protect)
            victim = self.victim(cache, part, taken)
            if victim is None and force:
                # every slot holds an expert this call uses: reuse the slot of one that runs earlier
                earlier = [*runs_before, *(ld.key for ld in loads)]
                ran = {k for k in earlier if k in cache.resident} - chosen
                if ran:
                    victim = self.victim(cache, part, taken - ran)
                if victim is None:
                    victim = next((k for k in earlier if cache.part(k) == part and k not in chosen and k not in cache.resident), None)
            if victim is None:
                if force:
                    raise PolicySpecError(f"no slot for {key}: the partition holds {cache.part_capacity[part]} slots")
                break
            taken.add(victim)
            chosen.add(victim)
            loads.append(Load(key, victim))
        return loads


_HOOKS = ("on_admit", "on_evict", "on_access")


def _hooked(cls: type) -> bool:
    return any(getattr(cls, h) is not getattr(Policy, h) for h in _HOOKS)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Za-z_][\w.\-/]*", v) else repr(v)
    return repr(v)


class DemandPolicy(Policy):
    """Load what the call misses, when it misses it; subclasses only choose victims.

    Execution order: the hits first (in access order), then the misses in load order, so resident
    experts compute while the misses copy.
    """

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        need = req.keys_in_access_order()
        resident = cache.resident
        misses = [k for k in need if k not in resident]
        if not misses:
            return LayerPlan(execute=need, order=need)
        hits = [k for k in need if k in resident]
        loads = self.make_room(cache, misses, set(need), hits)
        return LayerPlan(execute=need, order=hits + misses, loads=loads)


class Modifier(Policy):
    """A policy that composes after '+' (`lru+lookahead`, `lfu+fiddler`): it wraps the policy before
    it, its *base* (a replacement policy or another modifier), and adds to or changes the base's plans.

    Everything the modifier does not decide itself goes to the base, once, here: eviction choices
    (`victim`, hence `make_room` picks the base's victims), `reset`, `observe`, the trace fields and
    the look-ahead depth it needs, whether it needs the future, and its notes. The composite is lossy
    if either part is. A modifier given alone wraps `default_base` (`fiddler` is `lru+fiddler`).

    A subclass sets `Params` and overrides `plan`, usually as `plan = self.base.plan(req, cache)` and
    then changes to that plan; state it keeps must be built in `reset` (call `super().reset` first).
    """

    wraps = True
    default_base: ClassVar[str | None] = "lru"

    def __init__(self, params: BaseModel | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._base: Policy | None = None

    @property
    def base(self) -> Policy:
        if self._base is None:
            raise PolicySpecError(f"{self.name!r} is a modifier: wrap a replacement policy first, e.g. 'lru+{self.name}'")
        return self._base

    def wrap(self, base: Policy) -> None:
        self._base = base
        # instance attributes shadow the class-level declarations: what the composite reads and needs
        self.uses = frozenset(self.uses) | base.uses
        self.lookahead_depth = max(self.lookahead_depth, base.lookahead_depth)
        self.lossless = type(self).lossless and base.lossless

    @property
    def spec(self) -> str:
        return f"{self.base.spec}+{Policy.spec.fget(self)}"  # type: ignore[attr-defined]

    def required_fields(self) -> set[str]:
        return set(type(self).uses) | self.base.required_fields()

    def wants_future(self) -> bool:
        return self.needs_future or self.base.wants_future()

    def reset(self, model: ModelSpec, cache: ExpertCache, costs: CostModel | None, future: Future | None = None) -> None:
        super().reset(model, cache, costs, future)
        self.base.reset(model, cache, costs, future)

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        return self.base.plan(req, cache)

    def observe(self, step_end: Any) -> None:
        self.base.observe(step_end)

    def notes(self) -> list[str]:
        return self.base.notes()

    def victim(self, cache: ExpertCache, part: int, exclude: set[Key] | frozenset[Key]) -> Key | None:
        return self.base.victim(cache, part, exclude)


# -- registry ---------------------------------------------------------------------------------------
REGISTRY: dict[str, type[Policy]] = {}


def is_builtin(cls: type) -> bool:
    """Whether a policy class ships with this package (a module of `policies/`)."""
    return cls.__module__.startswith("policies.")


def register(name: str) -> Any:
    """Class decorator: make `cls` the policy `name` in every spec string.

    A name is taken once: a plugin may not take a built-in's name (its results would be mistaken for
    the built-in's), and two plugins may not take the same one. Registering the same class again (a
    module imported twice, by name and by file) is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PolicySpecError(f"policy name {name!r} is not a spec name (a letter, then letters, digits, '_' or '-')")

    def deco(cls: type[Policy]) -> type[Policy]:
        have = REGISTRY.get(name)
        if have is not None and have is not cls:
            same = have.__module__ == cls.__module__ and have.__qualname__ == cls.__qualname__
            if is_builtin(have) and not is_builtin(cls):
                raise PolicySpecError(
                    f"{cls.__module__}.{cls.__qualname__} registers the policy name {name!r}, which the built-in "
                    f"{have.__module__}.{have.__qualname__} has; choose another name"
                )
            if not same:
                raise PolicySpecError(
                    f"policy name {name!r} registered twice: by {have.__module__}.{have.__qualname__} and "
                    f"{cls.__module__}.{cls.__qualname__}"
                )
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


_NAME = re.compile(r"[A-Za-z][\w\-]*")


_SPEC_PART = re.compile(r"^\s*([A-Za-z][\w\-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`'lru+lookahead(depth=1)'` -> `[('lru', {}), ('lookahead', {'depth': 1})]`."""
    if not spec or not spec.strip():
        raise PolicySpecError("empty policy spec")
    out = []
    for part in _split_top(spec, "+"):
        m = _SPEC_PART.match(part)
        if not m:
            raise PolicySpecError(f"cannot parse policy spec {spec!r} at {part.strip()!r}; expected name or name(key=value, ...)")
        name, argtext = m.group(1).lower(), m.group(2)
        params: dict[str, Any] = {}
        if argtext and argtext.strip():
            for arg in _split_top(argtext, ","):
                key, eq, raw = arg.partition("=")
                key, raw = key.strip(), raw.strip()
                if not eq or not key.isidentifier() or not raw:
                    raise PolicySpecError(f"policy {name!r}: parameter {arg.strip()!r} is not key=value")
                try:
                    params[key] = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    params[key] = raw  # bare words are strings: metric=entropy
                except (TypeError, MemoryError, RecursionError):
                    raise PolicySpecError(f"policy {name!r}: parameter {key!r} has an unusable value {raw!r}") from None
        out.append((name, params))
    return out


def _describe_params(cls: type[Policy]) -> str:
    fields = cls.Params.model_fields
    if not fields:
        return "none"
    return ", ".join(f"{k} (default {_fmt(f.default)})" for k, f in fields.items())


def _build(name: str, params: dict[str, Any]) -> type[Policy] | Policy:
    import policies  # noqa: F401  (registers the built-in policies)
    from policies.plugins import entry_point_names, load_entry_point

    entry_point_names()  # the installed plugins' names, read once (a name that collides with a built-in is refused)
    cls = REGISTRY.get(name)
    if cls is None and load_entry_point(name):  # an installed package's policy, imported the first time it is named
        cls = REGISTRY.get(name)
    if cls is None:
        raise PolicySpecError(f"unknown policy {name!r}; known: {', '.join(names())}")
    try:
        p = cls.Params(**params)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(x) for x in err["loc"]) or "parameters"
        if err["type"] == "extra_forbidden":
            raise PolicySpecError(
                f"policy {name!r} has no parameter {field!r}; its parameters: {_describe_params(cls)}"
            ) from None
        raise PolicySpecError(f"policy {name!r}: parameter {field}: {err['msg']}") from None
    return cls(p)


def make_policy(spec: str) -> Policy:
    """Build the policy a spec string names (composition with '+' for modifiers)."""
    parts = parse_spec(spec)
    first_name, first_params = parts[0]
    policy = _build(first_name, first_params)
    assert isinstance(policy, Policy)
    if policy.wraps:
        default = getattr(policy, "default_base", None)
        if default is None:
            raise PolicySpecError(f"{first_name!r} is a modifier: put it after a replacement policy, e.g. 'lru+{first_name}'")
        base = _build(default, {})
        assert isinstance(base, Policy)
        policy.wrap(base)  # type: ignore[attr-defined]
    for name, params in parts[1:]:
        mod = _build(name, params)
        assert isinstance(mod, Policy)
        if not mod.wraps:
            raise PolicySpecError(f"{name!r} is a replacement policy; only modifiers can follow '+'")
        mod.wrap(policy)  # type: ignore[attr-defined]
        policy = mod
    return policy


PolicyLike = str | Policy | type[Policy]
"""What the tools accept as a policy in Python: a spec string, a Policy subclass (built with its
default parameters) or an instance (used as it is; it is `reset` at the start of each run)."""


def as_policy(policy: PolicyLike) -> Policy:
    """The policy a spec string, a Policy subclass or an instance stands for. A class or instance must
    be registered under its name (`@register`): results name their policy by its spec, and other
    processes (sweep workers) build it from that spec."""
    if isinstance(policy, str):
        return make_policy(policy)
    if isinstance(policy, type) and issubclass(policy, Policy):
        inst = policy()
    elif isinstance(policy, Policy):
        inst = policy
    else:
        raise PolicySpecError(f"a policy is a spec string, a Policy subclass or a Policy instance, not {type(policy).__name__}")
    cls = type(inst)
    if REGISTRY.get(cls.name) is not cls:
        inherited = f" (it inherits the name {cls.name!r})" if cls.name else ""
        raise PolicySpecError(
            f"policy class {cls.__module__}.{cls.__qualname__} is not registered{inherited}: decorate it with "
            "@register('its-name') so that results and other processes can name it"
        )
    if inst.wraps and inst.__dict__.get("_base") is None:
        default = getattr(inst, "default_base", None)
        if default is None:
            raise PolicySpecError(f"{cls.name!r} is a modifier: wrap a replacement policy first, e.g. 'lru+{cls.name}'")
        inst.wrap(make_policy(default))  # type: ignore[attr-defined]
    return inst


def available() -> dict[str, str]:
    """Name -> first docstring line of every policy: the built-in ones, those registered so far
    (plugins), and those that installed packages declare as entry points (loaded here)."""
    import policies  # noqa: F401
    from policies.plugins import load_all_entry_points

    load_all_entry_points()
    return {n: ((c.__doc__ or "").strip().splitlines() or [""])[0] for n, c in sorted(REGISTRY.items())}


def names() -> list[str]:
    """Every policy name a spec may use, without importing any plugin (for help texts and errors)."""
    import policies  # noqa: F401
    from policies.plugins import PluginError, entry_point_names

    try:
        eps = entry_point_names()
    except PluginError:
        eps = []
    return sorted({*REGISTRY, *eps})
