"""Models by name: a local Hugging Face checkpoint directory, or a tiny seeded model built from a
config (for tests; random weights route like noise: use trained checkpoints for quality studies).
Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY_SEED = 0


def _mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _olmoe() -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _deepseek_v3() -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _qwen3_moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _small_mixtral() -> nn.Module:
    """Mixtral's shape at 1/4 width and 1/4 depth (experts of 1024x3584, 25 MiB each in float32 — a
    real expert's transfer regime on a GPU link), random weights: for GPU validation, not for tests."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=1024, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


SMALL: dict[str, Callable[[], nn.Module]] = {"small-mixtral": _small_mixtral}

TINY: dict[str, Callable[[], nn.Module]] = {
    "tiny-mixtral": _mixtral,
    "tiny-olmoe": _olmoe,
    "tiny-qwen2-moe": _qwen2_moe,
    "tiny-deepseek-v3": _deepseek_v3,
    "tiny-qwen3-moe": _qwen3_moe,
}


class ModelError(ValueError):
    pass


DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """`--dtype`: auto (None: the checkpoint's own), bf16, fp16 or fp32 (or their torch names)."""
    if text is None or isinstance(text, torch.dtype):
        return text
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"unknown dtype {text!r}; expected one of auto, bf16, fp16, fp32")
    return DTYPES[key]


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config declares (`dtype`, formerly `torch_dtype`); float32 if none."""
    d = getattr(config, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and d not in ("auto", ""):
        got = DTYPES.get(d.lower().removeprefix("torch."))
        if got is not None:
            return got
    return torch.float32


def resolve(name: str) -> tuple[str, Path | None]:
    """(the model's name, its checkpoint directory or None for a tiny or small built model)."""
    if name.startswith("zoo:"):
        from runtime.zoo import checkpoint_dir

        try:
            path = checkpoint_dir(name)
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(str(exc)) from None
        try:
            name = path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            name = str(path)
        return name, path
    if name in TINY or name in SMALL:
        return name, None
    path = Path(name)
    if not path.is_dir():
        raise ModelError(f"unknown model {name!r}: not a local checkpoint directory, nor one of {', '.join([*TINY, *SMALL])}")
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
    return name, path


def read_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot read config.json: {str(exc).splitlines()[0]}") from None


def default_dtype(path: Path | None, config: Any = None) -> torch.dtype:
    """The dtype a model runs in unless `--dtype` says otherwise: the checkpoint's own (its config's),
    float32 for the built tiny and small models, and float32 for the zoo, whose float32-trained
    models are stored in float16 only to keep the repository small (`train_log.json` says so)."""
    if path is None:
        return torch.float32
    if (path / "train_log.json").exists() and '"saved_dtype"' in (path / "train_log.json").read_text(encoding="utf-8"):
        return torch.float32
    return config_dtype(config if config is not None else read_config(path))


def _quiet_bars():  # type: ignore[no-untyped-def]
    """transformers' progress bars off (a local checkpoint needs none), restored after."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def ctx():  # type: ignore[no-untyped-def]
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    return ctx()


def load_checkpoint(path: Path, dtype: torch.dtype, config: Any = None) -> nn.Module:
    """A local checkpoint on the host in `dtype`, through transformers' own loading (its key renaming
    and fusing of per-expert weights), with the safetensors shards read by `pread` instead of being
    memory-mapped, one tensor at a time (`HF_DEACTIVATE_ASYNC_LOAD`): the host then holds the model
    once plus the tensors of one conversion, not the model and the mapped files (measured in
    docs/benchmarks.md). A quantized checkpoint, or one without safetensors, loads the usual way."""
    import os

    from safetensors import safe_open
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = config if config is not None else read_config(path)
    shards = sorted(path.glob("*.safetensors"))
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ModelError(f"{path}: {type(config).__name__} has no causal-LM model class in transformers")
    handles: list[Any] = []
    prev = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        with _quiet_bars():
            if not shards or getattr(config, "quantization_config", None) is not None:
                model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
            else:
                handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in shards]
                state = {k: h.get_slice(k) for h in handles for k in h.keys()}
                model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
                del state
                if (path / "generation_config.json").exists():
                    from transformers import GenerationConfig

                    model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load: {str(exc).splitlines()[0]}") from None
    finally:
        handles.clear()
        if prev is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = prev
    model.config.name_or_path = str(path)
    from runtime.memory import release_freed_memory

    release_freed_memory()
    return model


def load_model(name: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               experts: str = "device", pin_bytes: int | None = None) -> tuple[nn.Module, str]:
    """(model in eval mode, its name). `name` is a tiny model's name, a zoo model (`zoo:coarse`,
    `zoo:fine`: a trained checkpoint shipped in runtime/zoo/checkpoints/) or a local checkpoint
    directory. A zoo model's name comes back as its checkpoint directory (relative to the working
    directory when it lies below it), where `runtime.record.encode` finds its tokenizer.

    `dtype`: None (or "auto") for the model's own (`default_dtype`). `experts="device"`: the whole
    model on `device` (it must fit); `experts="host"`: the routed experts go from the host copy
    into the slow tier (`runtime.offload.offload_experts`, at most `pin_bytes` of it page-locked) and
    only the rest of the model moves to `device`: the experts never reach the device outside the
    slots of a session."""
    dt = parse_dtype(dtype)
    name, path = resolve(name)
    dev = torch.device(device)
    if path is None:
        torch.manual_seed(TINY_SEED)
        model = (TINY.get(name) or SMALL[name])()
        model.config.name_or_path = name
        if dt is not None:
            model = model.to(dt)
    else:
        config = read_config(path)
        model = load_checkpoint(path, dt or default_dtype(path, config), config)
        model.config.name_or_path = name  # as given (a zoo model: its directory relative to the working directory)
    model = model.eval()
    if experts == "host":
        from runtime.offload import offload_experts

        offload_experts(model, dev, pin_bytes=pin_bytes)
    else:
        model = model.to(device=dev)
    return model, name
