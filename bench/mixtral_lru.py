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

from sim.config import CacheConfig  # noqa: E402
from sim.replay import replay  # noqa: E402

TRACES = {
    "gsm8k": ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz",
    "humaneval": ROOT / "traces" / "mixtral-8x7b-humaneval.jsonl.gz",
}
PUBLISHED = {"lru": {4: "0.589-0.591", 3: "0.464-0.470", 2: "0.337-0.351"}, "random": {4: "0.571", 3: "0.45", 2: "0.32"}}
POLICIES = {"lru": "lru", "random": "random(seed=0)", "belady": "belady"}


def main() -> None:
    print("| policy | experts per layer | gsm8k | humaneval | both (pooled) | published |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, spec in POLICIES.items():
        for k in (2, 3, 4):
            hits = accesses = 0
            cells = []
            for path in TRACES.values():
                m = replay(path, spec, CacheConfig(per_layer=k)).metrics
                cells.append(f"{m['hit_rate']:.3f}")
                hits += m["hits"] + m["inflight_hits"]
                accesses += m["accesses"]
            pub = PUBLISHED.get(name, {}).get(k, "-")
            print(f"| {spec} | {k} | {cells[0]} | {cells[1]} | {hits / accesses:.3f} | {pub} |")


if __name__ == "__main__":
    main()
