"""Print the model-preset table of docs/trace-format.md (markdown) from `traces.models.PRESETS`.

    python bench/model_table.py

One row per preset: its architecture, decoder layers, MoE layers, routed experts per MoE layer, top-k,
shared experts, parameters of one routed expert, the bytes of one routed expert in bf16, fp8 and int4
(`traces.models.expert_bytes`: 16, 8 and 4.125 bits per parameter), the dtype a trace header gets by
default (the checkpoint's own) and the bytes of all non-expert weights (bf16). Every number comes from
`model_preset()`, the function converters call, so the table shows what a header will carry.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traces.models import PRESETS, model_preset  # noqa: E402

DTYPES = ("bf16", "fp8", "int4")


def table() -> str:
    head = [
        "preset", "arch", "layers", "MoE layers", "experts", "top-k", "shared experts", "expert params",
        *(f"expert bytes {d}" for d in DTYPES), "default dtype", "dense bytes",
    ]
    right = set(range(2, len(head))) - {len(head) - 2}
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---:" if i in right else "---" for i in range(len(head))) + " |",
    ]
    for name, dims in PRESETS.items():
        spec = model_preset(name)
        sized = {d: model_preset(name, d).expert_bytes for d in DTYPES}
        row = [
            f"`{name}`", spec.arch, str(spec.num_layers), str(spec.num_moe_layers), str(spec.num_experts),
            str(spec.top_k), str(spec.num_shared_experts), f"{dims.expert_params:,}",
            *(f"{sized[d]:,}" for d in DTYPES), spec.dtype, f"{spec.dense_bytes:,}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
