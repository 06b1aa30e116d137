"""Real-format checkpoints with random weights, for tests and benchmarks of the loader.

`build_checkpoint` writes what a user brings: a Hugging Face checkpoint directory (config.json and
sharded safetensors, in the architecture's own checkpoint format: Mixtral's per-expert `w1/w2/w3`,
which transformers fuses when it loads) of a real architecture scaled down, in the dtype asked for.
The model is built on the meta device and materialised parameter by parameter with seeded random
values drawn in chunks in the target dtype, so building a checkpoint costs about its own size in
memory (save_pretrained needs the state dict), never a float32 copy of it. Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

#: Mixtral-8x7B's config (mistralai/Mixtral-8x7B-v0.1), the starting point of the scaled-down fixtures
MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}


#: real configs shipped for planning (`python -m runtime.plan --model config:NAME`), from the models' own config.json
CONFIGS: dict[str, dict[str, Any]] = {"mixtral-8x7b": MIXTRAL_8X7B}


def write_config(config: dict[str, Any], out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A checkpoint directory holding only `config.json` (enough to plan a run's memory)."""
    from transformers import AutoConfig

    cfg = dict(config)
    conf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    conf.dtype = dtype
    conf.save_pretrained(out)
    return Path(out)


def scaled_mixtral(**overrides: Any) -> dict[str, Any]:
    """Mixtral-8x7B's config with some fields replaced (fewer layers or experts, narrower)."""
    cfg = dict(MIXTRAL_8X7B)
    cfg.update(overrides)
    return cfg


def _fill_(t: torch.Tensor, std: float, gen: torch.Generator, chunk: int = 1 << 24) -> None:
    """Normal(0, std) values drawn `chunk` at a time in t's own dtype (no full-size float32 temporary)."""
    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i : i + chunk]
        part.copy_(torch.randn(part.numel(), generator=gen, dtype=torch.float32).mul_(std))


def build_checkpoint(config: dict[str, Any], out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     max_shard_size: str = "200MB", seed: int = 0) -> Path:
    """Write a checkpoint of `config` (a dict with `model_type`) to `out`; return `out`. Weights are
    N(0, initializer_range) (norm weights 1), seeded; the config records `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    conf = AutoConfig.for_model(model_type, **cfg)
    conf.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(conf, "initializer_range", 0.02))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                _fill_(p, std, gen)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the safetensors files of a checkpoint directory (what the loader reads)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def expected_sizes(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Parameter bytes of a Mixtral-style config, for sizing a fixture before building it."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    layers, v = config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    es = torch.empty(0, dtype=dtype).element_size()
    expert = 3 * h * i * es
    dense_layer = (2 * h * h + 2 * h * kv + n * h + 2 * h) * es
    dense = layers * dense_layer + (2 * v * h + h) * es
    return {"expert_bytes": expert, "experts_bytes": expert * n * layers, "dense_bytes": dense,
            "total_gb": (expert * n * layers + dense) / 1e9, "layers_for_2gb": math.ceil(2e9 / (expert * n + dense_layer))}
