"""The torch half of the loop: offloaded execution of Hugging Face MoE models, the trace recorder,
calibration and measured validation (docs/runtime.md). Needs the extra `.[runtime]`; never
imports simpy (only `runtime.validate` calls into `sim`). Without the extra, the package still
imports (its CLIs then say in one line how to install it) and its names raise that hint."""

try:
    from runtime.offload import OffloadError, OffloadSession, find_moe_layers, model_spec, offload
except ModuleNotFoundError as _exc:  # the runtime extra is not installed
    if _exc.name not in ("torch", "transformers", "safetensors"):
        raise
    from runtime._extra import INSTALL as _INSTALL

    def __getattr__(name: str):  # type: ignore[no-untyped-def]
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"runtime.{name} needs the runtime extra: {_INSTALL}")

__all__ = ["OffloadError", "OffloadSession", "find_moe_layers", "model_spec", "offload"]
