"""Run a model offloaded under a policy and report latency, hit rate, bytes moved and output quality.

    python -m runtime.run --model M --policy SPEC (--cache-experts N | --cache-per-layer K) --link L
        [--prompts FILE] [--text FILE] [--max-new-tokens N] [--json]

Quality is measured against the exact model (every expert as the router chose it) on the same input:
perplexity of `--text` (teacher-forced), the KL divergence of the next-token distributions on that
text, and the agreement of greedy generations token by token. A lossless policy scores exactly the
exact model; a lossy one pays what its substitutions and drops cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from policies import PolicySpecError
from runtime.links import LinkError
from runtime.models import ModelError, load_model
from runtime.offload import OffloadError, offload
from runtime.quality import compare
from runtime.record import RecordError, encode, read_prompts
from traces.cli import OneLineParser

DEFAULT_TEXT = (
    "Offloading keeps the experts of a mixture-of-experts model in host memory and copies the ones a "
    "token needs into a small cache on the GPU. Which experts to keep is the policy's choice."
)


def _quality_pass(model: torch.nn.Module, text_ids: torch.Tensor, prompts: list[torch.Tensor], max_new: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        logits = model(text_ids).logits[0].float()
        gens = [
            model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=max_new, min_new_tokens=max_new,
                           do_sample=False, pad_token_id=0)[0, p.shape[1]:]
            for p in prompts
        ]
    return logits, gens


def run(
    model_name: str,
    policy: str,
    *,
    cache_experts: int | None = None,
    cache_per_layer: int | None = None,
    link: str = "emulated:16GB/s",
    prompts: list[str] | None = None,
    text: str = DEFAULT_TEXT,
    max_new_tokens: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    model, name = load_model(model_name, device=device)
    prompts = prompts or [DEFAULT_TEXT[:60]]
    text_ids = encode(model, name, text).to(device)
    prompt_ids = [encode(model, name, p).to(device) for p in prompts]
    model.set_experts_implementation("eager")
    exact_logits, exact_gens = _quality_pass(model, text_ids, prompt_ids, max_new_tokens)
    size = {k: v for k, v in {"cache_experts": cache_experts, "cache_per_layer": cache_per_layer}.items() if v is not None}
    with offload(model, policy, link=link, name=name, **size) as session:
        logits, gens = _quality_pass(model, text_ids, prompt_ids, max_new_tokens)
    q = compare(exact_logits, logits, text_ids)
    agree = sum(int((a == b).sum()) for a, b in zip(gens, exact_gens, strict=True))
    total = sum(int(g.numel()) for g in exact_gens)
    m = session.metrics
    m.update(
        {
            "model": name,
            "policy": session.policy.spec,
            "link": str(session.link_spec),
            "perplexity": q.perplexity,
            "perplexity_exact": q.perplexity_exact,
            "kl_divergence": q.kl,
            "token_agreement": agree / total if total else 1.0,
        }
    )
    return m


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m runtime.run", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--policy", default="lru")
    p.add_argument("--cache-experts", type=int, metavar="N")
    p.add_argument("--cache-per-layer", type=int, metavar="K")
    p.add_argument("--link", default="emulated:16GB/s")
    p.add_argument("--prompts")
    p.add_argument("--text", type=Path, help="text for perplexity and KL (default: a built-in paragraph)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = p.parse_args(argv)
    prog = "runtime.run"
    if (args.cache_experts is None) == (args.cache_per_layer is None):
        print(f"{prog}: error: give exactly one of --cache-experts N and --cache-per-layer K", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args.prompts) if args.prompts else None
        if args.text is not None and not args.text.is_file():
            raise RecordError(f"{args.text}: no such text file")
        text = args.text.read_text(encoding="utf-8") if args.text else DEFAULT_TEXT
        m = run(args.model, args.policy, cache_experts=args.cache_experts, cache_per_layer=args.cache_per_layer,
                link=args.link, prompts=prompts, text=text, max_new_tokens=args.max_new_tokens, device=args.device)
    except (RecordError, ModelError, OffloadError, LinkError, PolicySpecError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1e3:.3f} ms"

    rows = [
        ("model", f"{m['model']}  policy {m['policy']}  link {m['link']}"),
        ("TTFT", ms(m["ttft_s"])),
        ("TPOT", ms(m["tpot_s"])),
        ("hit rate", f"{m['hit_rate']:.4f} ({m['hits']} hits + {m['inflight_hits']} in flight / {m['accesses']})"),
        ("bytes moved", f"{m['bytes_h2d'] / 1e6:.2f} MB in {m['misses']} loads + {m['prefetches']} prefetches"),
        ("perplexity", f"{m['perplexity']:.4f} (exact model {m['perplexity_exact']:.4f})"),
        ("KL(exact||run)", f"{m['kl_divergence']:.3e}"),
        ("token agreement", f"{m['token_agreement']:.4f}"),
    ]
    for k, v in rows:
        print(f"{k:<16} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
