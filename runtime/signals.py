"""What the runtime computes beside the routing, for policies that ask and for the recorder: the
router's probabilities, a look-ahead guess of later layers' experts, and a token-importance score."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SIGMOID_ROUTERS = {"deepseek_v3", "deepseek_v2", "glm4_moe", "dots1"}  # routers that score with a sigmoid


class RouterTap:
    """Forward hooks on the routers: the last logits each produced (for this layer call)."""

    def __init__(self, routers: list[nn.Module | None]):
        self.logits: dict[int, torch.Tensor] = {}
        self.hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers) if r is not None]

    def _hook(self, layer: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            self.logits[layer] = logits.detach()

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def probs_of(logits: torch.Tensor, arch: str) -> torch.Tensor:
    """The router's probabilities: softmax, or sigmoid scores for DeepSeek-style routers (float64)."""
    x = logits.double()
    return torch.sigmoid(x) if arch in SIGMOID_ROUTERS else torch.softmax(x, dim=-1)


def importance_of(probs: torch.Tensor) -> torch.Tensor:
    """1 - the normalised entropy of the router's distribution: how decided the router is about a token."""
    q = probs / probs.sum(dim=-1, keepdim=True)
    ent = -(q * torch.log(q.clamp_min(1e-300))).sum(dim=-1) / math.log(q.shape[-1])
    return 1.0 - ent


def lookahead_of(routers: list[nn.Module | None], layer: int, hidden: torch.Tensor, depth: int) -> dict[int, torch.Tensor]:
    """The experts the routers of the next `depth` MoE layers would pick for this layer's input."""
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for d in range(1, depth + 1):
            if layer + d < len(routers) and routers[layer + d] is not None:
                res = routers[layer + d].forward(hidden)  # forward(): the tap's hook does not fire
                idx = res[-1] if isinstance(res, tuple) else res
                out[layer + d] = idx.long()
    return out
