"""Train a zoo model from scratch on this CPU.

    python -m runtime.zoo.train --preset coarse|fine [--out DIR] [--minutes M] [--max-steps N] [--seed 0]

1. Corpus: the standard library's sources (`runtime.zoo.corpus`), split by file.
2. Tokenizer: a byte-level BPE of 2048 tokens trained offline on the training files.
3. Model: the preset's transformers architecture, seeded; AdamW, linear warm-up then cosine decay to
   `min_lr_frac` of the peak, gradient clipping at 1, random non-overlapping blocks of the training
   stream, loss = cross-entropy + the architecture's own load-balancing loss.
4. Budget: the loop ends after `--max-steps` steps or `--minutes` minutes, whichever comes first; the
   learning-rate schedule follows whichever of the two is further along, so a slow machine still
   ends with a decayed learning rate (the log says which bound ended the run).
5. Output: the model in float16 safetensors (`save_pretrained`), the tokenizer, and `train_log.json`
   with the held-out perplexity of the saved checkpoint (read back in float32) and of its untrained
   twin (same config and seed, no training). Written to a temporary folder first, then put in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.zoo import CHECKPOINTS, LOG_FILE, NAMES
from traces.cli import OneLineParser

TRAIN_EVAL_BLOCKS = 128  # training blocks (drawn at random, seeded) on which the final train loss is measured


def _lr(preset: Any, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / preset.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return preset.lr * warm * (preset.min_lr_frac + (1 - preset.min_lr_frac) * cos)


def _fastest(history: list[dict[str, float]]) -> float | None:
    """Seconds per step over the fastest interval between two progress evaluations: the machine's
    speed when it was least shared."""
    best = None
    prev_step, prev_s = 0, 0.0
    for h in history:
        if h["step"] > prev_step:
            rate = (h["seconds"] - prev_s) / (h["step"] - prev_step)
            best = rate if best is None else min(best, rate)
        prev_step, prev_s = int(h["step"]), h["seconds"]
    return None if best is None else round(best, 3)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dir_bytes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def train(
    preset_name: str,
    out: Path,
    *,
    minutes: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from runtime.models import load_model
    from runtime.zoo.corpus import blocks, fast_tokenizer, stdlib_corpus, token_stream, train_tokenizer
    from runtime.zoo.presets import (
        PRESETS,
        VOCAB,
        build_model,
        count_params,
        make_config,
        mean_nll,
        perplexity,
    )

    t_start = time.perf_counter()
    preset = PRESETS[preset_name]
    minutes = preset.minutes if minutes is None else minutes
    max_steps = preset.max_steps if max_steps is None else max_steps
    torch.manual_seed(seed)

    corpus = stdlib_corpus()
    tok = train_tokenizer(corpus.texts(corpus.train), VOCAB)
    train_ids = token_stream(tok, corpus.texts(corpus.train))
    held_ids = token_stream(tok, corpus.texts(corpus.held_out))
    train_blocks = blocks(train_ids, preset.seq_len)
    held_blocks = blocks(held_ids, preset.seq_len)
    g = torch.Generator().manual_seed(seed)
    train_eval = train_blocks[torch.randperm(len(train_blocks), generator=g)[:TRAIN_EVAL_BLOCKS]]
    probe = held_blocks[torch.randperm(len(held_blocks), generator=g)[:16]]  # for the progress bar

    config = make_config(preset)
    model = build_model(config, seed)
    params = count_params(model)
    twin_nll = mean_nll(model, held_blocks)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    budget_s = minutes * 60
    history: list[dict[str, float]] = []
    order = torch.randperm(len(train_blocks), generator=g)
    cursor = 0
    step = 0
    tokens = 0
    recent: list[tuple[float, float]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, desc=f"train {preset_name}", unit=" step", file=sys.stderr, disable=None)
    t_loop = time.perf_counter()
    cpu_loop = time.process_time()
    stop = "max_steps"
    try:
        while step < max_steps:
            elapsed = time.perf_counter() - t_loop
            prog = max(step / max_steps, elapsed / budget_s)
            if prog >= 1.0:
                stop = "minutes"
                break
            lr = _lr(preset, step, prog)
            for grp in opt.param_groups:
                grp["lr"] = lr
            if cursor + preset.batch > len(order):
                order = torch.randperm(len(train_blocks), generator=g)
                cursor = 0
            x = train_blocks[order[cursor : cursor + preset.batch]]
            cursor += preset.batch
            out_ = model(input_ids=x, labels=x, output_router_logits=True)
            loss = out_.loss  # cross-entropy + router_aux_loss_coef * load-balancing loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += x.numel()
            aux = float(out_.aux_loss.detach())
            recent = (recent + [(float(loss.detach()) - preset.config["router_aux_loss_coef"] * aux, aux)])[-50:]
            if step % preset.eval_every == 0 or step == max_steps:
                ho = mean_nll(model, probe)
                history.append({
                    "step": step, "tokens": tokens, "seconds": round(time.perf_counter() - t_loop, 1), "lr": lr,
                    "train_ce": sum(r[0] for r in recent) / len(recent), "aux": sum(r[1] for r in recent) / len(recent),
                    "held_out_probe_ce": ho,
                })
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(ce=f"{recent[-1][0]:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens / (time.perf_counter() - t_loop):.0f}")
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t_loop
    train_cpu_s = time.process_time() - cpu_loop

    # save through a temporary folder next to `out`, in float16, then read it back as load_model does
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    hf_logging.disable_progress_bar()
    try:
        model.eval()
        model.config.output_router_logits = False  # inference needs no router logits
        model.to(torch.float16).save_pretrained(tmp)
        fast_tokenizer(tok).save_pretrained(tmp)
        saved, _ = load_model(str(tmp), dtype="fp32")  # float32, as every tool loads the zoo
        held_nll = mean_nll(saved, held_blocks)
        train_nll = mean_nll(saved, train_eval)
        sizes = _dir_bytes(tmp)
        log = {
            "preset": preset_name,
            "architecture": type(model).__name__,
            "command": command,
            "seed": seed,
            "config": {k: v for k, v in preset.config.items() if k != "output_router_logits"},
            "params": params,
            "saved_dtype": "float16",
            "corpus": corpus.describe(),
            "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size()},
            "tokens": {"train": len(train_ids), "held_out": len(held_ids), "held_out_blocks": len(held_blocks),
                       "seq_len": preset.seq_len},
            "optimizer": {"name": "AdamW", "lr": preset.lr, "betas": [0.9, 0.95], "weight_decay": preset.weight_decay,
                          "warmup_steps": preset.warmup, "schedule": "cosine on max(step/max_steps, time/budget)",
                          "min_lr_frac": preset.min_lr_frac, "grad_clip": 1.0, "batch": preset.batch},
            "budget": {"max_steps": max_steps, "minutes": minutes, "stopped_by": stop},
            "steps": step,
            "tokens_seen": tokens,
            "train_seconds": round(train_s, 1),
            "train_cpu_seconds": round(train_cpu_s, 1),  # all threads: about threads x train_seconds on idle cores
            "seconds_per_step": {"overall": round(train_s / max(step, 1), 3), "fastest_eval_interval": _fastest(history)},
            "threads": torch.get_num_threads(),
            "final": {
                "train_ce_last50": sum(r[0] for r in recent) / len(recent) if recent else None,
                "aux_loss_last50": sum(r[1] for r in recent) / len(recent) if recent else None,
                "train_loss": train_nll, "train_perplexity": perplexity(train_nll),
                "held_out_loss": held_nll, "held_out_perplexity": perplexity(held_nll),
            },
            "untrained_twin": {"held_out_loss": twin_nll, "held_out_perplexity": perplexity(twin_nll)},
            "history": history,
            "files_bytes": sizes,
        }
        log["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        mask = _umask()
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return log


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m runtime.zoo.train", description="Train a zoo MoE model on the stdlib's sources.")
    p.add_argument("--preset", required=True, choices=NAMES)
    p.add_argument("--out", type=Path, help="checkpoint folder (default runtime/zoo/checkpoints/PRESET)")
    p.add_argument("--minutes", type=float, help="time budget of the training loop (default: the preset's)")
    p.add_argument("--max-steps", type=int, help="step budget (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (args.minutes is not None and args.minutes <= 0) or (args.max_steps is not None and args.max_steps < 1):
        print("runtime.zoo.train: error: --minutes must be > 0 and --max-steps >= 1", file=sys.stderr)
        return 2
    out = args.out or CHECKPOINTS / args.preset
    command = "python -m runtime.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    log = train(args.preset, out, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                progress=not args.no_progress, command=command)
    f = log["final"]
    tw = log["untrained_twin"]
    print(
        f"wrote {out}: {log['architecture']}, {log['params']['total']:,} parameters, {log['steps']} steps "
        f"({log['tokens_seen']:,} tokens, {log['train_seconds']:.0f} s of training, {log['wall_seconds']:.0f} s in all, "
        f"stopped by {log['budget']['stopped_by']}); held-out perplexity {f['held_out_perplexity']:.2f} "
        f"(untrained twin {tw['held_out_perplexity']:.1f}), train perplexity {f['train_perplexity']:.2f}; "
        f"{sum(log['files_bytes'].values()) / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
