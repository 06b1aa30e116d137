"""The torch half of the loop: offloaded execution of Hugging Face MoE models, the trace recorder,
calibration and measured validation (DESIGN.md section 6). Needs the extra `.[runtime]`; never
imports simpy (only `runtime.validate` calls into `sim`)."""

from runtime.offload import OffloadError, OffloadSession, find_moe_layers, model_spec, offload

__all__ = ["OffloadError", "OffloadSession", "find_moe_layers", "model_spec", "offload"]
