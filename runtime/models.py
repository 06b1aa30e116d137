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


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """(model in eval mode, its name). `name` is a tiny model's name, a zoo model (`zoo:coarse`,
    `zoo:fine`: a trained checkpoint shipped in runtime/zoo/checkpoints/) or a local checkpoint
    directory. A zoo model's name comes back as its checkpoint directory (relative to the working
    directory when it lies below it), where `runtime.record.encode` finds its tokenizer."""
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
    if name in TINY or name in SMALL:
        torch.manual_seed(TINY_SEED)
        model = (TINY.get(name) or SMALL[name])()
        model.config.name_or_path = name
    else:
        path = Path(name)
        if not path.is_dir():
            raise ModelError(f"unknown model {name!r}: not a local checkpoint directory, nor one of {', '.join([*TINY, *SMALL])}")
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local checkpoint loads in a blink; the bar was only noise on stderr
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path}: cannot load: {str(exc).splitlines()[0]}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    model = model.to(device=device, dtype=dtype).eval()
    return model, name
