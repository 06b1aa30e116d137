"""Per-layer expert-cache hit rates on the real Mixtral-8x7B traces, beside the published figures.

    python bench/mixtral_lru.py

Published (h39s/mlsys fork of mixtral-offloading, logs/*/overall_results.txt, Mixtral-8x7B generating
256 tokens of its own prompts): LRU 0.589-0.591 / 0.464-0.470 / 0.337-0.351 with 4 / 3 / 2 experts
cached per layer; random eviction 0.571 / 0.45 / 0.32.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.cache import CacheConfig  # noqa: E402
from sim.replay import replay  # noqa: E402

TRACES = {
    "gsm8k": ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz",
    "humaneval": ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz",
}
PUBLISHED = {"lru": {4: "0.589-0.591", 3: "0.464-0.470", 2: "0.337-0.351"}, "random": {4: "0.571", 3: "0.45", 2: "0.32"}}
POLICIES = {"lru": ["lru"], "random": [f"random(seed={s})" for s in range(5)], "belady": ["belady"]}


def main() -> None:
    print("| policy | experts per layer | gsm8k | humaneval | both (pooled) | published |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, specs in POLICIES.items():
        label = name if len(specs) == 1 else f"{name} (mean of seeds 0-{len(specs) - 1})"
        for k in (2, 3, 4):
            hits = {p: 0 for p in TRACES}
            accesses = {p: 0 for p in TRACES}
            for spec in specs:
                for p, path in TRACES.items():
                    m = replay(path, spec, CacheConfig(per_layer=k)).metrics
                    hits[p] += m["hits"] + m["inflight_hits"]
                    accesses[p] += m["accesses"]
            cells = [f"{hits[p] / accesses[p]:.3f}" for p in TRACES]
            pooled = sum(hits.values()) / sum(accesses.values())
            pub = PUBLISHED.get(name, {}).get(k, "-")
            print(f"| {label} | {k} | {cells[0]} | {cells[1]} | {pooled:.3f} | {pub} |")


if __name__ == "__main__":
    main()
