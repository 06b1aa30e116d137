"""What the offloading runtime costs when nothing needs to move, and how busy it keeps a slow link.

    python bench/runtime_overhead.py [--tokens 32] [--repeats 3]

1. Time per decode token of the un-offloaded Hugging Face model, with its default experts
   implementation (`grouped_mm`, which on a CPU falls back to a slow generic kernel) and with
   `eager` (transformers' per-expert loop, the same arithmetic the runtime does), and of the same
   model inside `offload()` with every expert resident (cache = all experts, warmed up); same
   process, same inputs. The ratio to the faster HF variant is the runtime's own overhead (policy,
   bookkeeping, routing to the host).
2. Transfer-bound on the emulated link (small cache, slow link): the fraction of the run the link
   is busy copying.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runtime import offload  # noqa: E402
from runtime.models import load_model  # noqa: E402


def small_mixtral() -> torch.nn.Module:
    """A Mixtral with experts big enough that compute, not Python, dominates a decode step."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
    )).eval()


def decode_ms(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """Mean time per decode step of greedy generation (prefill excluded)."""
    times: list[float] = []

    def pre(m, a, k):  # type: ignore[no-untyped-def]
        times.append(time.perf_counter())

    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)
    finally:
        h.remove()
    steps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]  # forward starts: decode steps only
    return statistics.median(steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; median ms per decode step, "
          f"best of {args.repeats} runs of {args.tokens} tokens")
    print("| model | experts | HF default ms/token | HF eager ms/token | offloaded, all resident ms/token | ratio to the faster HF |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, build in (("tiny-mixtral", lambda: load_model("tiny-mixtral")[0]), ("small-mixtral (512 x 1792)", small_mixtral)):
        model = build()
        ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        n_exp = int(model.config.num_local_experts)
        default_impl = model.config._experts_implementation
        default, eager, off = [], [], []
        for _ in range(args.repeats):
            model.set_experts_implementation(default_impl)
            default.append(decode_ms(model, ids, args.tokens))
            model.set_experts_implementation("eager")
            eager.append(decode_ms(model, ids, args.tokens))
            with offload(model, "lru", cache_per_layer=n_exp, link="emulated:1000GB/s") as s:
                s.preload()  # every expert resident: nothing to copy, only the runtime's own work is left
                decode_ms(model, ids, 4)
                off.append(decode_ms(model, ids, args.tokens))
                assert s.counters.misses == 0
        d, e, o = min(default), min(eager), min(off)
        print(f"| {label} | {n_exp} x {model.config.num_hidden_layers} layers, top-2 | {d:.3f} ({default_impl}) | {e:.3f} | "
              f"{o:.3f} | {o / min(d, e):.3f} |")

    print()
    print("| model | cache | link | link busy | TPOT ms | hit rate |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    model = small_mixtral()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    for link in ("emulated:0.1GB/s,20us", "emulated:0.5GB/s,20us", "emulated:2GB/s,20us"):
        with offload(model, "lru", cache_per_layer=2, link=link) as s, torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                           do_sample=False, pad_token_id=0)
        m = s.metrics
        print(f"| small-mixtral | 2 per layer | {link} | {m['link_busy_frac']:.3f} | {m['tpot_s'] * 1e3:.2f} | {m['hit_rate']:.3f} |")


if __name__ == "__main__":
    main()
