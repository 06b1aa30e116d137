"""Run a model offloaded under a policy and report latency, hit rate, bytes moved, output quality and memory.

    python -m runtime.run --model M --policy SPEC (--cache-experts N | --cache-per-layer K) --link L
        [--prompts FILE] [--text FILE] [--max-new-tokens N] [--batch-size B] [--dtype D] [--pin-gb G] [--json]

Quality is measured against the exact model (every expert as the router chose it) on the same input:
perplexity of `--text` (teacher-forced), the KL divergence of the next-token distributions on that
text, and the agreement of greedy generations token by token. The exact model runs offloaded too,
under `lru` with the same cache (a lossless policy is exact), so no step needs the whole model on the
device. A lossless policy scores exactly the exact model; a lossy one pays what its substitutions
and drops cost.
"""

from __future__ import annotations

from runtime._extra import require

if __name__ == "__main__":
    require("runtime.run")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from policies import CacheError, PolicySpecError, load_plugins  # noqa: E402
from runtime.cli import add_model_options, cache_sizes, positive, read_text, runtime_parser  # noqa: E402
from runtime.links import LinkError, parse_link  # noqa: E402
from runtime.loader import open_model  # noqa: E402
from runtime.memory import MemoryError_  # noqa: E402
from runtime.models import ModelError  # noqa: E402
from runtime.offload import OffloadError, offload  # noqa: E402
from runtime.quality import compare  # noqa: E402
from runtime.record import RecordError, batches, encode, encode_batch, pad_id, read_prompts  # noqa: E402

DEFAULT_TEXT = (
    "Offloading keeps the experts of a mixture-of-experts model in host memory and copies the ones a "
    "token needs into a small cache on the GPU. Which experts to keep is the policy's choice."
)


def _quality_pass(model: torch.nn.Module, text_ids: torch.Tensor, prompts: list[tuple[torch.Tensor, torch.Tensor]],
                  max_new: int, pad: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        logits = model(text_ids).logits[0].float()
        gens = []
        for ids, mask in prompts:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad)
            gens.extend(out[:, ids.shape[1]:])
    return logits, gens


def _reference_link(link: str) -> str:
    """The exact pass moves the same experts, as fast as the link kind allows (its timing is not reported)."""
    return "cuda" if parse_link(link).kind == "cuda" else "emulated:10TB/s"


def run(
    model_name: str,
    policy: str,
    *,
    cache_experts: int | None = None,
    cache_per_layer: int | None = None,
    cache_gb: float | None = None,
    link: str = "emulated:16GB/s",
    prompts: list[str] | None = None,
    text: str = DEFAULT_TEXT,
    max_new_tokens: int = 16,
    device: str = "cpu",
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    pin_gb: float | None = None,
) -> dict[str, Any]:
    prompts = prompts or [DEFAULT_TEXT[:60]]
    if max_new_tokens < 1 or batch_size < 1:
        raise RecordError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    size = {k: v for k, v in {"cache_experts": cache_experts, "cache_per_layer": cache_per_layer, "cache_gb": cache_gb}.items()
            if v is not None}
    parse_link(link)  # a bad link is refused before anything is loaded
    opened = open_model(model_name, dtype=dtype, device=device, pin_gb=pin_gb, batch=batch_size, prompts=prompts,
                        new_tokens=max_new_tokens, score_text=text, **size)
    model, name, dev = opened.model, opened.name, opened.device
    text_ids = encode(model, name, text).to(dev)
    pad = pad_id(model)
    prompt_ids = [tuple(t.to(dev) for t in encode_batch(model, name, b, pad)) for b in batches(prompts, batch_size)]
    with offload(model, "lru", link=_reference_link(link), name=name, **size):  # the exact model, offloaded
        exact_logits, exact_gens = _quality_pass(model, text_ids, prompt_ids, max_new_tokens, pad)  # type: ignore[arg-type]
    with offload(model, policy, link=link, name=name, **size) as session:
        logits, gens = _quality_pass(model, text_ids, prompt_ids, max_new_tokens, pad)  # type: ignore[arg-type]
    q = compare(exact_logits, logits, text_ids)
    agree = sum(int((a == b).sum()) for a, b in zip(gens, exact_gens, strict=True))
    total = sum(int(g.numel()) for g in exact_gens)
    m = session.metrics
    m.update(
        {
            "model": name,
            "policy": session.policy.spec,
            "link": str(session.link_spec),
            "dtype": session.spec.dtype,
            "expert_bytes": session.spec.expert_bytes,
            "batch_size": batch_size,
            "perplexity": q.perplexity,
            "perplexity_exact": q.perplexity_exact,
            "kl_divergence": q.kl,
            "token_agreement": agree / total if total else 1.0,
            **opened.memory_report(),
        }
    )
    return m


def build_parser() -> argparse.ArgumentParser:
    p = runtime_parser("runtime.run", __doc__)
    add_model_options(p, policy_default="lru", batch=True)
    p.add_argument("--prompts", help="prompts file: .txt (one per line) or .jsonl (a 'prompt' per line); default: one built-in prompt")
    p.add_argument("--text", type=Path, help="UTF-8 text file for perplexity and KL (default: a built-in paragraph)")
    p.add_argument("--max-new-tokens", type=positive, default=16, help="tokens generated per prompt")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "runtime.run"
    if cache_sizes(args) != 1:
        print(f"{prog}: error: give exactly one of --cache-experts N, --cache-per-layer K and --cache-gb X", file=sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        prompts = read_prompts(args.prompts) if args.prompts else None
        text = read_text(args.text) if args.text else DEFAULT_TEXT
        m = run(args.model, args.policy, cache_experts=args.cache_experts, cache_per_layer=args.cache_per_layer, cache_gb=args.cache_gb,
                link=args.link, prompts=prompts, text=text, max_new_tokens=args.max_new_tokens, device=args.device,
                batch_size=args.batch_size, dtype=args.dtype, pin_gb=args.pin_gb)
    except (RecordError, ModelError, OffloadError, LinkError, PolicySpecError, CacheError, MemoryError_) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1e3:.3f} ms"

    def gib(x: int | None) -> str:
        return "n/a" if x is None else f"{x / 2**30:.2f} GiB"

    tier = ""
    if "host_tier_pinned_bytes" in m:
        tier = f"; host tier {gib(m['host_tier_pinned_bytes'])} pinned + {gib(m['host_tier_pageable_bytes'])} pageable"
    rows = [
        ("model", f"{m['model']}  policy {m['policy']}  link {m['link']}  {m['dtype']}  batch {m['batch_size']}"),
        ("TTFT", ms(m["ttft_s"])),
        ("TPOT", ms(m["tpot_s"])),
        ("hit rate", f"{m['hit_rate']:.4f} ({m['hits']} hits + {m['inflight_hits']} in flight / {m['accesses']})"),
        ("bytes moved", f"{m['bytes_h2d'] / 1e6:.2f} MB in {m['misses']} loads + {m['prefetches']} prefetches "
                        f"({m['expert_bytes'] / 2**20:.2f} MiB per expert)"),
        ("perplexity", f"{m['perplexity']:.4f} (exact model {m['perplexity_exact']:.4f})"),
        ("KL(exact||run)", f"{m['kl_divergence']:.3e}"),
        ("token agreement", f"{m['token_agreement']:.4f}"),
        ("peak memory", f"host RSS {gib(m['peak_host_rss_bytes'])}; device allocated {gib(m['peak_device_allocated_bytes'])}{tier}"),
    ]
    for k, v in rows:
        print(f"{k:<16} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
