"""Output quality of an offloaded run against the exact model, token by token.

`python -m runtime.run` scores its text in one prefill forward: a single layer call per layer, where
policies that learn from the calls they see (`substitute`, `buddy`) have no statistics yet and a
per-token rule acts once per layer on a whole block. Offloaded decoding calls every MoE layer once
per token, and that is where the lossy policies act. `teacher_forced` reads a text the same way: one
decode call per token (the KV cache carries the context), the next-token logits of every position
kept, so a policy makes the decisions it makes while decoding, on text whose next token is known.
`compare` turns the logits of a run and of the exact model into perplexities and the KL divergence
of the next-token distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def teacher_forced(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position of every row of `ids` (`batch x T` token ids), each row read
    as its own sequence, one decode call per token: `batch x T x vocab` (float32)."""
    rows = []
    with torch.no_grad():
        for row in ids:
            out, cache = [], None
            for i in range(row.shape[0]):
                r = model(row[None, i : i + 1], cache=cache, use_cache=True)
                cache = r.cache
                out.append(r.logits[0, -1].float())
            rows.append(torch.stack(out))
    return torch.stack(rows)


@dataclass(frozen=True)
class Quality:
    """A run's logits against the exact model's on the same text (`tokens` predicted tokens)."""

    perplexity: float
    perplexity_exact: float
    kl: float  # mean KL(exact || run) of the next-token distributions, nats per token
    tokens: int
    nll_change_se: float  # standard error of the mean per-token change of the negative log-likelihood (nats)

    @property
    def perplexity_change(self) -> float:
        return self.perplexity - self.perplexity_exact

    @property
    def nll_change(self) -> float:
        """The mean per-token change of the negative log-likelihood (nats): log of the perplexity ratio."""
        return math.log(self.perplexity / self.perplexity_exact)


def compare(exact: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> Quality:
    """`exact` and `logits` (`batch x T x vocab`, or `T x vocab` for one row) of the same `ids`
    (`batch x T` or `1 x T`): the perplexity of each on the next tokens (every position but each
    row's last, computed in float64), the mean KL divergence from the exact distribution, and the
    standard error of the per-token log-likelihood change (how far the perplexity change stands out
    from the noise of a finite text)."""
    if exact.dim() == 2:
        exact, logits = exact[None], logits[None]
    ids = ids.reshape(exact.shape[0], exact.shape[1])
    target = ids[:, 1:].reshape(-1)
    lp = torch.log_softmax(exact[:, :-1].double(), -1).reshape(target.shape[0], -1)
    lq = torch.log_softmax(logits[:, :-1].double(), -1).reshape(target.shape[0], -1)
    tok_nll = -lq.gather(1, target[:, None])[:, 0]
    tok_nll_exact = -lp.gather(1, target[:, None])[:, 0]
    n = int(target.shape[0])
    diff = tok_nll - tok_nll_exact
    se = float(diff.std() / math.sqrt(n)) if n > 1 else 0.0
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return Quality(math.exp(float(tok_nll.mean())), math.exp(float(tok_nll_exact.mean())), max(kl, 0.0), n, se)
