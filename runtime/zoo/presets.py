"""The zoo's two presets, the models they build and how they are scored.

- `coarse`: `MixtralForCausalLM`, 8 experts per layer, top-2 (Mixtral's regime).
- `fine`: `OlmoeForCausalLM`, 32 experts per layer, top-4 (the fine-grained regime of OLMoE and
  DeepSeekMoE: many small experts, the same 1/8 active share as OLMoE's 8 of 64).

Both have 4 decoder layers of width 128, a 2048-token byte-level BPE vocabulary with tied input and
output embeddings, and the same number of expert parameters (about 1.57 M); the fine experts are a
quarter of the coarse ones' width. Each trains with its architecture's own load-balancing loss
(`output_router_logits=True`, weighted by `router_aux_loss_coef`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 2048


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # the transformers config class's model_type
    config: dict[str, Any]
    seq_len: int = 256
    batch: int = 16
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    max_steps: int = 1500
    minutes: float = 12.0  # wall-clock budget of the training loop: it ends at max_steps or here
    eval_every: int = 100
    extra: dict[str, Any] = field(default_factory=dict)


_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "output_router_logits": True, "router_aux_loss_coef": 0.01,
}

PRESETS: dict[str, Preset] = {
    "coarse": Preset(
        "coarse", "mixtral",
        {**_COMMON, "intermediate_size": 128, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2},
        max_steps=1800,
    ),
    "fine": Preset(
        "fine", "olmoe",
        {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 4, "num_experts": 32, "num_experts_per_tok": 4},
        max_steps=1300,
    ),
}


def make_config(preset: Preset) -> Any:
    from transformers import MixtralConfig, OlmoeConfig

    cls = {"mixtral": MixtralConfig, "olmoe": OlmoeConfig}[preset.arch]
    return cls(**preset.config)


def build_model(config: Any, seed: int) -> nn.Module:
    """A freshly initialised float32 model of `config`, seeded: the training run's starting point
    and, untrained, its twin."""
    from transformers import MixtralForCausalLM, OlmoeForCausalLM

    cls = {"mixtral": MixtralForCausalLM, "olmoe": OlmoeForCausalLM}[config.model_type]
    torch.manual_seed(seed)
    return cls(config).float()


def count_params(model: nn.Module) -> dict[str, int]:
    seen: set[int] = set()
    total = experts = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
    return {"total": total, "experts": experts}


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every position of the blocks but the first of each."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x, output_router_logits=False).logits[:, :-1].float()
        target = x[:, 1:]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    model.train(was_training)
    return total / count


def perplexity(nll: float) -> float:
    return math.exp(nll)
