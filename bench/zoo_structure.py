"""The zoo models: their training summary and the structure of their routing.

    python bench/zoo_structure.py

Prints three Markdown tables:
1. training: from each checkpoint's `train_log.json` (steps, tokens, time, held-out perplexity of the
   trained model and of its untrained twin, checkpoint size);
2. expert popularity per MoE layer in the shipped traces `traces/zoo-*.jsonl.gz` (`traces.stats`): the
   most popular expert's share of the layer's accesses and the top quarter's, beside uniform routing's
   1/N and 25 %, and the normalised entropy (1 = uniform);
3. LRU with C slots per layer: each layer's hit rate (the policy's own plan and cache, layer by layer,
   `sim.curves.simulate_hits`) and all layers together (`sim.replay.replay`, which must count the same
   hits), beside C/N, the hit rate of uniform independent routing at the same cache size;
4. the same on held-out text read teacher-forced (no generation, so no greedy loops): the first
   `HELD_OUT_BLOCKS` held-out blocks of 256 tokens, token after token, each token one call per layer
   with the experts the router chose; with each layer's top-1 share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.cache import CacheConfig  # noqa: E402
from runtime.zoo import CHECKPOINTS, LOG_FILE, NAMES  # noqa: E402
from sim.curves import Calls, read_calls, simulate_hits  # noqa: E402
from sim.replay import replay  # noqa: E402
from traces.stats import trace_stats  # noqa: E402

TRACES = {n: ROOT / "traces" / f"zoo-{n}.jsonl.gz" for n in NAMES}
SIZES = {"coarse": [2, 3, 4, 6], "fine": [4, 8, 12, 16]}
HELD_OUT_BLOCKS = 8


def layer_calls(calls: Calls, layer: int) -> Calls:
    """The calls of one MoE layer, in trace order (a per-layer cache sees nothing else)."""
    idx = np.flatnonzero(calls.layers == layer)
    sizes = calls.call_sizes()[idx]
    starts = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    keys = np.concatenate([calls.keys[calls.starts[i] : calls.starts[i + 1]] for i in idx]) if len(idx) else calls.keys[:0]
    return Calls(calls.model, keys, starts, calls.layers[idx], calls.steps[idx], calls.truncated)


def per_layer_lru(name: str) -> list[dict[str, object]]:
    path = TRACES[name]
    calls = read_calls(path)
    n_layers, n = calls.model.num_moe_layers, calls.model.num_experts
    rows = []
    for c in SIZES[name]:
        hits, accesses = [], []
        for layer in range(n_layers):
            sub = layer_calls(calls, layer)
            hits.append(simulate_hits(sub, "lru", CacheConfig(per_layer=c)))
            accesses.append(sub.accesses)
        m = replay(path, "lru", CacheConfig(per_layer=c)).metrics
        assert m["hits"] + m["inflight_hits"] == sum(hits) and m["accesses"] == sum(accesses), (name, c)
        rows.append({"size": c, "uniform": c / n, "layers": [h / a for h, a in zip(hits, accesses, strict=True)],
                     "all": m["hit_rate"]})
    return rows


def held_out_calls(name: str) -> list[Calls]:
    """Per MoE layer, the calls of the held-out blocks read teacher-forced: one call per token, its
    top-k experts by decreasing router probability."""
    import torch
    from transformers.utils import logging as hf_logging

    from runtime.models import load_model
    from runtime.zoo.corpus import held_out_blocks
    from traces.io import read_header

    hf_logging.disable_progress_bar()
    spec = read_header(TRACES[name]).model
    model, path = load_model(str(CHECKPOINTS / name))
    blocks = held_out_blocks(path, length=256, max_blocks=HELD_OUT_BLOCKS)
    with torch.no_grad():
        logits = model(input_ids=blocks, output_router_logits=True).router_logits
    k = spec.top_k
    out = []
    for layer, lg in enumerate(logits):
        top = torch.topk(torch.softmax(lg.float(), dim=-1), k, dim=-1).indices.numpy().astype(np.int64)
        n_calls = len(top)
        out.append(Calls(spec, (layer * spec.num_experts + top).reshape(-1), np.arange(n_calls + 1, dtype=np.int64) * k,
                         np.full(n_calls, layer, dtype=np.int64), np.arange(n_calls, dtype=np.int64)))
    return out


def main() -> None:
    print("| model | architecture | parameters (experts) | experts x top-k | steps | tokens seen | training time | "
          "held-out ppl | untrained twin ppl | train ppl | checkpoint |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in NAMES:
        log = json.loads((CHECKPOINTS / name / LOG_FILE).read_text(encoding="utf-8"))
        cfg = log["config"]
        experts = cfg.get("num_local_experts", cfg.get("num_experts"))
        size = sum(f.stat().st_size for f in (CHECKPOINTS / name).iterdir() if f.is_file())
        print(f"| zoo:{name} | {log['architecture']} | {log['params']['total'] / 1e6:.2f} M "
              f"({log['params']['experts'] / 1e6:.2f} M) | {experts} x {cfg['num_experts_per_tok']} | {log['steps']} | "
              f"{log['tokens_seen'] / 1e6:.2f} M | {log['train_seconds'] / 60:.1f} min ({log['wall_seconds'] / 60:.1f} in all) | "
              f"{log['final']['held_out_perplexity']:.2f} | {log['untrained_twin']['held_out_perplexity']:.0f} | "
              f"{log['final']['train_perplexity']:.2f} | {size / 1e6:.2f} MB |")
    print()
    print("| trace | layer | accesses | top-1 share (uniform) | top-25 % share (uniform 0.25) | normalised entropy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in NAMES:
        s = trace_stats(TRACES[name])
        n = s["model"]["num_experts"]
        for ly in s["layers"]:
            print(f"| zoo-{name} | {ly['layer']} | {ly['accesses']} | {ly['top1_share']:.3f} ({1 / n:.3f}) | "
                  f"{ly['top25pct_share']:.3f} | {ly['entropy']:.3f} |")
    print()
    rows = {name: per_layer_lru(name) for name in NAMES}
    n_layers = max(len(r["layers"]) for rs in rows.values() for r in rs)  # type: ignore[arg-type]
    print("| trace | C per layer | C/N (uniform) | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " | all layers |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in range(n_layers)) + " | ---: |")
    for name in NAMES:
        for r in rows[name]:
            cells = " | ".join(f"{h:.3f}" for h in r["layers"])  # type: ignore[attr-defined]
            print(f"| zoo-{name} | {r['size']} | {r['uniform']:.3f} | {cells} | {r['all']:.3f} |")
    print()
    print(f"| zoo:NAME on {HELD_OUT_BLOCKS} x 256 held-out tokens | C per layer | C/N (uniform) | "
          + " | ".join(f"layer {i}" for i in range(n_layers)) + " | all layers |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in range(n_layers)) + " | ---: |")
    for name in NAMES:
        per_layer = held_out_calls(name)
        n = per_layer[0].model.num_experts
        top1 = [np.bincount(c.keys % n, minlength=n).max() / c.accesses for c in per_layer]
        print(f"| zoo:{name} top-1 share | - | {1 / n:.3f} | " + " | ".join(f"{t:.3f}" for t in top1) + " | - |")
        for size in SIZES[name]:
            hits = [simulate_hits(c, "lru", CacheConfig(per_layer=size)) for c in per_layer]
            cells = " | ".join(f"{h / c.accesses:.3f}" for h, c in zip(hits, per_layer, strict=True))
            total = sum(hits) / sum(c.accesses for c in per_layer)
            print(f"| zoo:{name} | {size} | {size / n:.3f} | {cells} | {total:.3f} |")


if __name__ == "__main__":
    main()
