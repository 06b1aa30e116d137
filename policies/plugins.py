"""Policies from other packages: entry points and `--plugin MODULE`.

Two ways in, both ending in `@register`:

- An installed package declares its policies in the entry-point group `moe_offload_lab.policies`, one
  entry point per policy, named as the policy:

      [project.entry-points."moe_offload_lab.policies"]
      mru = "my_policies.mru:MRU"          # a Policy subclass (registered under "mru" if it is not yet)
      s4 = "my_policies.s4"                # or a module whose @register calls register "s4"

  Nothing is imported until a spec names the policy (or `available()` lists every policy), so an
  installed plugin costs nothing to the commands that do not use it; `names()` knows them without an
  import.
- `--plugin MODULE` on every command that builds policies (or `plugins = [...]` in a sweep file, or
  `load_plugins([...])` in Python) imports a module, by name (`my_policies.mru`, found on `sys.path`)
  or by file (`path/to/mru.py`), whose `@register` calls register its policies.

Every process that builds policies imports the same plugins: a sweep hands its workers (process pool
or Ray) the modules of the policies it runs (`plugin_modules`), and they import them before building.

A plugin that cannot be imported, raises on import, or registers a name a built-in policy already has
is a `PluginError`: one line naming the plugin (the tools print it and exit with status 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from policies.base import REGISTRY, Policy, PolicySpecError, is_builtin, parse_spec

GROUP = "moe_offload_lab.policies"

_loaded: dict[str, str] = {}  # plugin as given -> the module name it was imported as
_entry_points: dict[str, EntryPoint] | None = None
_discovery_error: str | None = None


class PluginError(PolicySpecError):
    """A plugin that cannot be used; `str(err)` is one line naming it."""


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {msg}"


def _import(target: str) -> str:
    """Import a module by name or from a .py file; returns its module name."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin {target!r}: no such file")
        name = path.stem
        have = sys.modules.get(name)
        if have is not None and getattr(have, "__file__", None) and Path(have.__file__).resolve() == path:
            return name
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin {target!r}: not a Python module")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # so that its classes pickle by reference, as an imported module's do
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return name
    importlib.import_module(target)
    return target


def load_plugin(target: str) -> str:
    """Import one plugin (a module name or a .py file), once per process; returns its module name."""
    got = _loaded.get(target)
    if got is not None:
        return got
    _builtins()
    try:
        name = _import(target)
    except PluginError:
        raise
    except PolicySpecError as exc:  # a name collision or a bad registration, raised by register()
        raise PluginError(f"plugin {target!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise PluginError(
                f"plugin {target!r}: cannot import it: no module named {exc.name!r} (is it installed, or on PYTHONPATH?)"
            ) from None
        raise PluginError(f"plugin {target!r}: raised on import: {_one_line(exc)}{_where(exc)}") from None
    except Exception as exc:
        raise PluginError(f"plugin {target!r}: raised on import: {_one_line(exc)}{_where(exc)}") from None
    _loaded[target] = name
    return name


def load_plugins(targets: Iterable[str]) -> list[str]:
    """Import every plugin (see `load_plugin`); returns their module names."""
    return [load_plugin(t) for t in targets]


def _builtins() -> None:
    import policies  # noqa: F401  (registers the built-in policies first: a plugin cannot take their names)


def _discover() -> dict[str, EntryPoint]:
    """The group's entry points by name (metadata only, nothing imported), once per process."""
    global _entry_points, _discovery_error
    if _discovery_error is not None:
        raise PluginError(_discovery_error)
    if _entry_points is None:
        _builtins()
        found: dict[str, EntryPoint] = {}
        try:
            for ep in entry_points(group=GROUP):
                if ep.name in found and found[ep.name].value != ep.value:
                    raise PluginError(
                        f"plugin {ep.name!r}: two installed packages declare it ({_dist(found[ep.name])} and {_dist(ep)})"
                    )
                found[ep.name] = ep
                cls = REGISTRY.get(ep.name)
                if cls is not None and is_builtin(cls):
                    raise PluginError(
                        f"plugin {ep.name!r} (entry point {ep.value} of {_dist(ep)}): its name collides with the "
                        f"built-in policy {ep.name!r}; rename the entry point"
                    )
        except PluginError as exc:
            _discovery_error = str(exc)  # every later use says it again
            raise
        _entry_points = found
    return _entry_points


def _dist(ep: EntryPoint) -> str:
    d = getattr(ep, "dist", None)
    return f"the package {d.name}" if d is not None else "an installed package"


def load_entry_point(name: str) -> bool:
    """Load the entry point that declares policy `name`, if one does; True if it did."""
    eps = _discover()
    ep = eps.get(name)
    if ep is None:
        return False
    if name in REGISTRY:
        return True
    where = f"plugin {name!r} (entry point {ep.value} of {_dist(ep)})"
    try:
        obj = ep.load()
    except PolicySpecError as exc:
        raise PluginError(f"{where}: {exc}") from None
    except Exception as exc:
        raise PluginError(f"{where}: raised on import: {_one_line(exc)}{_where(exc)}") from None
    if isinstance(obj, type) and issubclass(obj, Policy):
        if name not in REGISTRY:
            from policies.base import register

            try:
                register(name)(obj)
            except PolicySpecError as exc:
                raise PluginError(f"{where}: {exc}") from None
        elif REGISTRY[name] is not obj:
            raise PluginError(f"{where}: the name is registered by another class, {_qual(REGISTRY[name])}")
    elif name not in REGISTRY:
        raise PluginError(f"{where}: it loaded, but registered no policy {name!r} (point it at a Policy subclass)")
    return True


def load_all_entry_points() -> None:
    for name in _discover():
        load_entry_point(name)


def entry_point_names() -> list[str]:
    return sorted(_discover())


def _qual(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def plugin_modules(policy: Policy) -> list[str]:
    """The modules, other than the built-in ones, whose classes make up `policy` (a composite's parts
    too): what another process must import to build it from its spec."""
    out: list[str] = []
    p: Any = policy
    while p is not None:
        cls = type(p)
        if not is_builtin(cls) and cls.__module__ not in out:
            out.append(cls.__module__)
        p = getattr(p, "_base", None)
    return out


def spec_modules(spec: str) -> list[str]:
    """`plugin_modules` of the policies a spec names, without building it."""
    out: list[str] = []
    for name, _ in parse_spec(spec):
        cls = REGISTRY.get(name)
        if cls is not None and not is_builtin(cls) and cls.__module__ not in out:
            out.append(cls.__module__)
    return out
