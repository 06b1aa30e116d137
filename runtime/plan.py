"""Plan a run's memory before having the hardware, or the weights: dense bytes, expert bytes, the KV
and activation reserve, and how many expert slots fit a device of a given size.

    python -m runtime.plan --model DIR|config:mixtral-8x7b [--budget-gib 23.5] [--batch-size B]
        [--prompt-tokens N] [--new-tokens N] [--dtype D] [--cache-per-layer K | --cache-experts N]

Only the model's config is read (a meta-device model: no weight), so a checkpoint directory with
nothing but its config.json will do, and `config:NAME` names a real config shipped with the repo
(`runtime.checkpoints.CONFIGS`). Without `--budget-gib` the budget is this machine's `--device`.
The arithmetic is `runtime.memory`'s, the one `runtime.run`/`record`/`validate` check before loading.
"""

from __future__ import annotations

from runtime._extra import require

if __name__ == "__main__":
    require("runtime.plan")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from runtime import memory  # noqa: E402
from runtime.cli import positive, runtime_parser  # noqa: E402
from runtime.loader import check_device, skeleton  # noqa: E402
from runtime.models import ModelError, parse_dtype  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = runtime_parser("runtime.plan", __doc__)
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json is enough), a built test model, "
                   "or config:NAME for a shipped real config (config:mixtral-8x7b)")
    p.add_argument("--dtype", default="auto", help="auto (the config's), bf16, fp16 or fp32")
    p.add_argument("--device", default="cpu", help="whose memory is the budget when --budget-gib is not given")
    p.add_argument("--budget-gib", type=float, default=None, help="device memory the run may allocate, GiB (e.g. 23.5 "
                   "for a 24 GB card, its CUDA context taken off)")
    p.add_argument("--batch-size", type=positive, default=1, help="sequences run together")
    p.add_argument("--prompt-tokens", type=positive, default=512, help="longest prompt, tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--score-tokens", type=int, default=0, help="tokens of a text scored in one forward (runtime.run's --text)")
    p.add_argument("--cache-per-layer", type=positive, metavar="K", help="slots per MoE layer (default: the most that fit)")
    p.add_argument("--cache-experts", type=positive, metavar="N", help="slots shared by all layers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "runtime.plan"
    try:
        name = args.model
        with tempfile.TemporaryDirectory() as tmp:
            if name.startswith("config:"):
                from runtime.checkpoints import CONFIGS, write_config

                if name[7:] not in CONFIGS:
                    raise ModelError(f"unknown config {name[7:]!r}; shipped: {', '.join(CONFIGS)}")
                name = str(write_config(CONFIGS[name[7:]], Path(tmp) / name[7:]))
            _, spec, config = skeleton(name, parse_dtype(args.dtype))
        if spec is None:
            raise ModelError(f"{args.model}: no MoE layer that dispatches through transformers' experts registry")
        dev = check_device(args.device)
        n = spec.num_moe_layers
        slots = args.cache_experts or (args.cache_per_layer or spec.top_k) * n
        plan = memory.plan_memory(spec, config, dev, slots, batch=args.batch_size, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, score_tokens=args.score_tokens,
                                  min_slots=spec.top_k * n if args.cache_per_layer else spec.top_k,
                                  attn_implementation=getattr(config, "_attn_implementation", None))
        if args.budget_gib is not None:
            plan = plan.model_copy(update={"budget_bytes": int(args.budget_gib * memory.GIB), "device": "cuda",
                                           "budget_source": f"--budget-gib {args.budget_gib:g}"})
    except (ModelError, ValueError) as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    gib = memory.GIB
    fits = plan.max_slots()
    print(f"model      {args.model}: {n} MoE layers x {spec.num_experts} experts, top-{spec.top_k}, {spec.dtype}")
    print(f"expert     {spec.expert_bytes / 2**20:.1f} MiB each; all {n * spec.num_experts}: {plan.host_tier_bytes / gib:.2f} GiB "
          "(the host tier)")
    print(f"dense      {spec.dense_bytes / gib:.2f} GiB (on the device)")
    print(f"reserve    {plan.reserve_bytes / gib:.2f} GiB: KV {plan.kv_bytes / gib:.2f} GiB ({args.batch_size} x "
          f"{args.prompt_tokens + args.new_tokens} positions), activations {plan.activation_bytes / gib:.2f} GiB, "
          f"margin {plan.margin_bytes / gib:.2f} GiB")
    print(f"budget     {plan.budget_bytes / gib:.2f} GiB ({plan.budget_source})")
    per_layer = fits // n
    print(f"slots      at most {fits} fit ({fits / (n * spec.num_experts):.1%} of the experts): --cache-experts {fits}"
          + (f" or --cache-per-layer {per_layer}" if per_layer >= spec.top_k else
             f" (a per-layer cache needs top_k={spec.top_k} per layer, {spec.top_k * n} slots)")
          + ("" if fits >= plan.min_slots else f"; the smallest cache needs {plan.min_slots}: it cannot run"))
    if args.cache_per_layer or args.cache_experts:
        print(f"asked      {plan.slots} slots: {plan.summary()} -> {'fits' if plan.need_bytes <= plan.budget_bytes else 'does NOT fit'}")
    return 0 if fits >= plan.min_slots else 1


if __name__ == "__main__":
    raise SystemExit(main())
