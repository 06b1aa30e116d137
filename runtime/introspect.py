"""Reading a Hugging Face MoE model: which modules are its routed experts (those that dispatch through
transformers' experts registry), what the slow tier stores of each expert, the trace header's model
block, and the cosine similarity of the experts' weights. Pure inspection: nothing here moves weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from traces.schema import ModelSpec

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class OffloadError(ValueError):
    """A model or setting the runtime cannot offload; the message is one line."""


# -- finding the MoE layers --------------------------------------------------------------------------
@dataclass
class MoELayer:
    index: int  # index into moe_layers
    decoder_layer: int
    name: str
    experts: nn.Module
    router: nn.Module | None


def _is_experts(m: nn.Module) -> bool:
    """Modules whose class `use_experts_implementation` decorated: they dispatch through the registry."""
    return all(hasattr(m, a) for a in ("has_gate", "is_transposed", "num_experts", "down_proj"))


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    layers: list[MoELayer] = []
    for name, m in model.named_modules():
        if not _is_experts(m):
            continue
        parts = name.split(".")
        if "layers" not in parts:
            raise OffloadError(f"cannot tell which decoder layer the experts module {name!r} belongs to")
        decoder_layer = int(parts[parts.index("layers") + 1])
        parent = model.get_submodule(".".join(parts[:-1]))
        router = next((getattr(parent, a) for a in ("gate", "router") if isinstance(getattr(parent, a, None), nn.Module)), None)
        layers.append(MoELayer(len(layers), decoder_layer, name, m, router))
    return layers


def _expert_parts(experts: nn.Module) -> list[str]:
    names = ["gate_up_proj" if experts.has_gate else "up_proj", "down_proj"]
    if experts.has_bias:
        names += [("gate_up_proj" if experts.has_gate else "up_proj") + "_bias", "down_proj_bias"]
    return names


def model_spec(model: nn.Module, layers: list[MoELayer] | None = None, name: str | None = None) -> ModelSpec:
    """The trace header's model block, read off a loaded model."""
    layers = layers if layers is not None else find_moe_layers(model)
    if not layers:
        raise OffloadError(
            f"{type(model).__name__} has no MoE layer that dispatches through transformers' experts registry: nothing to offload"
        )
    cfg = model.config
    ex = layers[0].experts
    down = ex.down_proj
    inter = int(down.shape[1] if ex.is_transposed else down.shape[2])
    dtype = next(iter(ex.parameters())).dtype
    expert_bytes = sum(getattr(ex, p)[0].numel() * getattr(ex, p).element_size() for p in _expert_parts(ex))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", None) or getattr(cfg, "moe_topk", None)
    if not top_k:
        raise OffloadError("cannot read top_k (num_experts_per_tok) from the model config")
    shared = getattr(cfg, "n_shared_experts", None) or getattr(cfg, "num_shared_experts", None) or 0
    if not shared and getattr(cfg, "shared_expert_intermediate_size", 0):
        shared = 1
    return ModelSpec(
        name=name or getattr(cfg, "name_or_path", "") or cfg.model_type,
        arch=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        moe_layers=[ly.decoder_layer for ly in layers],
        num_experts=int(ex.num_experts),
        top_k=int(top_k),
        num_shared_experts=int(shared),
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=inter,
        dtype=_DTYPES.get(dtype, str(dtype).removeprefix("torch.")),
        expert_bytes=expert_bytes,
        dense_bytes=total - expert_bytes * ex.num_experts * len(layers),
    )


def expert_similarity(layers: list[MoELayer], chunk: int = 1 << 22, store: Any = None) -> list[list[list[float]]]:
    """Per MoE layer, the cosine similarity of every pair of its routed experts' weights: each expert
    is one vector, the parts the slow tier stores (`_expert_parts`: gate/up, down, biases if any)
    flattened and concatenated, as in its `ExpertStore` buffer. The dot products are accumulated in
    float64, `chunk` values at a time (a real model's experts are never converted whole). Exactly
    symmetric (the upper triangle mirrored), diagonal exactly 1, an all-zero expert 0 elsewhere; plain
    Python floats, which JSON carries exactly, so a replay of the trace sees the runtime's numbers.

    It reads the experts modules' own weights, or, once they are offloaded (meta placeholders), the
    slow tier `store` (a `runtime.tiers.ExpertStore`): the same values in the same dtype, taken in
    the same chunks, so the numbers do not depend on where the weights are."""
    out: list[list[list[float]]] = []
    with torch.no_grad():
        for ly in layers:
            ex = ly.experts
            n = int(ex.num_experts)
            gram = None
            for p in _expert_parts(ex):
                param = getattr(ex, p)
                size = param[0].numel()
                step = max(1, chunk // n)
                for c in range(0, size, step):
                    if param.is_meta:
                        if store is None:
                            raise OffloadError(f"the experts of {ly.name} are offloaded and no slow tier was given")
                        x = store.columns(ly.index, p, c, c + step).to(torch.float64)
                    else:
                        x = param.detach().reshape(n, -1)[:, c : c + step].to(torch.float64)
                    g = x @ x.T
                    gram = g if gram is None else gram + g
            assert gram is not None
            gram = gram.cpu()
            norm = gram.diagonal().sqrt()
            den = torch.outer(norm, norm)
            cos = torch.where(den > 0, gram / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)
            upper = torch.triu(cos, 1)
            cos = upper + upper.T
            cos.fill_diagonal_(1.0)
            out.append(cos.tolist())
    return out

