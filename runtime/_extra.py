"""The runtime's optional extra: its CLIs say in one line how to install it instead of a traceback.
This module imports nothing outside the standard library."""

from __future__ import annotations

import importlib.util
import sys

INSTALL = "pip install 'moe-offload-lab[runtime]'  (torch, transformers, safetensors)"


def missing() -> list[str]:
    """The runtime extra's packages that are not importable."""
    out = []
    for mod in ("torch", "transformers", "safetensors"):
        try:
            if sys.modules.get(mod, 0) is None or importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def require(prog: str) -> None:
    """Exit 2 with one line if the runtime extra is not installed (call before importing torch)."""
    gone = missing()
    if gone:
        print(f"{prog}: error: needs the runtime extra ({', '.join(gone)} not installed): {INSTALL}", file=sys.stderr)
        raise SystemExit(2)
