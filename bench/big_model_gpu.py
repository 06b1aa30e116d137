"""A model several times bigger than the GPU memory it is given: an ~8 GB bf16 checkpoint run
offloaded under a 3 GiB cap (`torch.cuda.set_per_process_memory_fraction`), against a CPU
reference, with the device memory it used set against the plan (issue 10).

    python bench/big_model_gpu.py                  # on a CUDA machine: a few minutes
    python bench/big_model_gpu.py --device cpu --layers 2 --hidden 512   # the same steps on a CPU, small

Steps: build (once, under results/) a bf16 checkpoint of Mixtral-8x7B's config at half its width
(hidden 2048, experts of 2048 x 7168, 88 MB each), 11 layers of 8 experts: 8.1 GB; cap the process's
device memory at `--cap-gib`; open it with `runtime.loader.open_model` (memory planned first: dense +
2 slots per layer + reserve must fit the cap), run a prompt's prefill and 16 greedy tokens under
`lru` on the `cuda` link; then, in a child process, the unoffloaded eager model on the CPU (bf16)
gives the reference logits of the same prompt. Checked: the logits agree within bf16 tolerance
(max |diff| <= 2% of the reference's largest |logit|, greedy next tokens equal at >= 95% of the
positions), `torch.cuda.max_memory_allocated` <= dense + slots + reserve as planned, and the cap is
well below the model (checkpoint bytes > --min-ratio x cap). Writes docs/validation/big-model-gpu.json
(or --out) with the figures. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = ("Mixture-of-experts models route every token to a few experts; when the experts do not fit in GPU "
          "memory, the runtime keeps them in host memory and copies the ones each token needs.")

REFERENCE = """
import sys, torch
from runtime.models import load_model
from runtime.record import encode
path, out = sys.argv[1:3]
model, name = load_model(path)  # the whole model on the CPU, in the checkpoint's dtype
model.set_experts_implementation("eager")
with torch.no_grad():
    torch.save(model(encode(model, name, sys.argv[3])).logits, out)
"""


def shape(hidden: int, layers: int) -> dict[str, int]:
    return {"vocab_size": 32000, "hidden_size": hidden, "intermediate_size": hidden * 7 // 2, "num_hidden_layers": layers,
            "num_local_experts": 8, "num_attention_heads": max(hidden // 128, 1), "num_key_value_heads": max(hidden // 512, 1),
            "max_position_embeddings": 4096}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (the same steps, for a dry run)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (experts are hidden x 3.5 hidden)")
    p.add_argument("--layers", type=int, default=11, help="decoder layers (11 at hidden 2048: 8.1 GB)")
    p.add_argument("--cap-gib", type=float, default=3.0, help="device memory the process may allocate (CUDA)")
    p.add_argument("--cache-per-layer", type=int, default=2, help="expert slots per layer")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated")
    p.add_argument("--min-ratio", type=float, default=2.5, help="the checkpoint must be this many times the cap")
    p.add_argument("--dir", type=Path, default=ROOT / "results" / "big-model-gpu", help="where the checkpoint is built")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "validation" / "big-model-gpu.json", help="results file")
    args = p.parse_args(argv)

    import torch

    from runtime.checkpoints import build_checkpoint, checkpoint_bytes, scaled_mixtral
    from runtime.loader import open_model
    from runtime.offload import offload
    from runtime.record import encode

    path = args.dir / f"mixtral-{args.hidden}h-{args.layers}l-bf16"
    if not (path / "config.json").exists():
        print(f"building {path} ...", file=sys.stderr)
        build_checkpoint(scaled_mixtral(**shape(args.hidden, args.layers)), path, max_shard_size="1GB")
    size = checkpoint_bytes(path)
    dev = torch.device(args.device)
    res: dict[str, object] = {"date": dt.datetime.now().isoformat(timespec="minutes"), "machine": platform.node(),
                              "loadavg": os.getloadavg(), "checkpoint": path.name, "checkpoint_bytes": size,
                              "device": args.device, "cache_per_layer": args.cache_per_layer}
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(args.cap_gib * 2**30 / total, 1.0), dev)
        res.update({"gpu": torch.cuda.get_device_name(dev), "cap_bytes": int(args.cap_gib * 2**30), "gpu_total_bytes": total})
    opened = open_model(str(path), device=args.device, cache_per_layer=args.cache_per_layer, prompts=[PROMPT],
                        new_tokens=args.new_tokens)
    model, name, plan = opened.model, opened.name, opened.plan
    assert plan is not None
    ids = encode(model, name, PROMPT).to(dev)
    link = "cuda" if dev.type == "cuda" else "emulated:100GB/s"
    with offload(model, "lru", cache_per_layer=args.cache_per_layer, link=link, name=name) as s, torch.no_grad():
        logits = model(ids).logits.float().cpu()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    m = s.metrics
    mem = opened.memory_report()
    with tempfile.TemporaryDirectory() as work:
        ref_file = Path(work) / "ref.pt"
        subprocess.run([sys.executable, "-c", REFERENCE, str(path), str(ref_file), PROMPT], cwd=ROOT, check=True)
        ref = torch.load(ref_file).float()
    diff = float((logits - ref).abs().max())
    scale = float(ref.abs().max())
    agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    planned = plan.dense_bytes + plan.slot_bytes + plan.reserve_bytes
    peak = mem["peak_device_allocated_bytes"]
    checks = {
        "logits_within_bf16_tolerance": diff <= 0.02 * scale,
        "greedy_agreement_ge_95pct": agree >= 0.95,
        "device_peak_within_plan": peak is None or peak <= planned,
        "model_well_above_cap": dev.type != "cuda" or size > args.min_ratio * args.cap_gib * 2**30,
    }
    res.update({
        "tpot_s": m["tpot_s"], "ttft_s": m["ttft_s"], "hit_rate": m["hit_rate"], "misses": m["misses"],
        "bytes_per_miss": m["bytes_h2d"] // max(m["misses"], 1), "expert_bytes": s.spec.expert_bytes,
        "logits_max_abs_diff": diff, "logits_max_abs": scale, "greedy_agreement": agree,
        "planned_device_bytes": planned, "plan": plan.model_dump(), **mem, "checks": checks,
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    gib = 2**30
    print(f"{path.name}: {size / 1e9:.2f} GB bf16 on {res.get('gpu', args.device)}"
          + (f" capped at {args.cap_gib:g} GiB" if dev.type == "cuda" else ""))
    print(f"plan: {plan.summary()}")
    print(f"device peak allocated: {'n/a' if peak is None else f'{peak / gib:.2f} GiB'} (planned {planned / gib:.2f} GiB); "
          f"peak host RSS {mem['peak_host_rss_bytes'] / gib:.2f} GiB")
    print(f"logits vs CPU eager: max |diff| {diff:.4g} (largest |logit| {scale:.4g}); greedy agreement {agree:.3f}")
    print(f"TTFT {m['ttft_s']:.3f} s, TPOT {m['tpot_s']:.3f} s, hit rate {m['hit_rate']:.3f}, {m['misses']} misses of "
          f"{s.spec.expert_bytes / 2**20:.1f} MiB")
    for k, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {k}")
    print(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
