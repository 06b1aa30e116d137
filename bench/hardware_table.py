"""Print the hardware-preset tables of docs/hardware.md (markdown) from lab/profiles/*.json.

    python bench/hardware_table.py [--model mixtral-8x7b] [--dtype bf16] [--section presets|defaults]

Table 1 lists each preset's datasheet figures and the modelled link rate; table 2 the efficiency
factors and overheads the roofline applies to them; table 3 what the cost model makes of them for
the given model (default Mixtral-8x7B in bf16): the transfer time of one expert, the GPU time of one
expert for one token, and how many experts fit in the HBM left for the cache
(`HardwareProfile.expert_budget_bytes // expert_bytes`); then every preset's `references`.
`--section defaults` prints instead the default of every optional field of the profile format.

Units: memory sizes (HBM, reserve, expert and dense weights) in GiB (2**30 bytes, `lab.hardware.GIB`,
what vendors call GB); bandwidths in decimal GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from lab.hardware import (  # noqa: E402
    GIB,
    Cost,
    CPUProfile,
    GPUProfile,
    HardwareProfile,
    HostProfile,
    LinkProfile,
    load_profile,
    presets,
)
from traces.models import model_preset  # noqa: E402


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _g(x: float) -> str:
    return f"{x:g}"


def defaults() -> None:
    """The default of every field that has one, straight from the pydantic models."""
    rows = []
    parts: list[tuple[str, type[BaseModel]]] = [
        ("", HardwareProfile), ("link.", LinkProfile), ("gpu.", GPUProfile), ("cpu.", CPUProfile), ("fit.*.", Cost),
        ("host.", HostProfile),
    ]
    for prefix, model in parts:
        for name, field in model.model_fields.items():
            if field.default is PydanticUndefined and field.default_factory is None:
                continue
            value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            if isinstance(value, BaseModel):  # a cost: all zero
                value = value.model_dump(exclude_defaults=True)
            rows.append([f"`{prefix}{name}`", f"`{value!r}`" if not isinstance(value, bool) else f"`{str(value).lower()}`"])
    print(_table(["field", "default"], rows, right=set()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="model preset (traces.models)")
    ap.add_argument("--dtype", default="bf16", help="expert dtype (default bf16)")
    ap.add_argument("--section", choices=["presets", "defaults"], default="presets")
    args = ap.parse_args(argv)
    if args.section == "defaults":
        defaults()
        return 0
    model = model_preset(args.model, args.dtype)
    profiles = [load_profile(name) for name in presets()]
    # fastest link first, then largest memory: the order a reader compares cards in
    profiles.sort(key=lambda p: (-p.link.h2d_gbps, -p.gpu.hbm_gib, p.name))

    hw_rows = []
    for p in profiles:
        g, c, ln = p.gpu, p.cpu, p.link
        theo = ln.theoretical_gbps
        hw_rows.append([
            f"`{p.name}`", g.name, _g(g.hbm_gib), _g(g.hbm_gbps), _g(g.peak_tflops),
            _g(theo) if theo is not None else "n/a", _g(ln.h2d_gbps),
            f"{ln.h2d_gbps / theo:.0%}" if theo else "n/a", c.name, _g(c.mem_gbps),
        ])
    print("Table 1: presets (datasheet figures; modelled H2D = the rate the simulator uses)\n")
    print(_table(
        ["preset", "GPU", "HBM GiB", "HBM GB/s", "bf16 TFLOPS", "PCIe theoretical GB/s", "modelled H2D GB/s",
         "H2D / theoretical", "host CPU", "DRAM GB/s"],
        hw_rows, right={2, 3, 4, 5, 6, 7, 9},
    ))

    as_rows = []
    for p in profiles:
        g, c, ln = p.gpu, p.cpu, p.link
        as_rows.append([
            f"`{p.name}`", f"{g.flops_efficiency:.0%}", f"{g.hbm_efficiency:.0%}", _g(g.expert_overhead_us),
            _g(g.dense_overhead_us), _g(c.peak_gflops), f"{c.flops_efficiency:.0%}", f"{c.mem_efficiency:.0%}",
            _g(c.expert_overhead_us), _g(ln.latency_us), str(ln.copy_engines), "yes" if ln.pinned else "no",
        ])
    print("\nTable 2: assumptions (efficiency factors, overheads, link latency) the roofline applies\n")
    print(_table(
        ["preset", "GPU FLOPS eff.", "HBM eff.", "GPU expert overhead us", "dense overhead us", "CPU peak GFLOPS",
         "CPU FLOPS eff.", "DRAM eff.", "CPU expert overhead us", "link latency us", "copy engines", "pinned"],
        as_rows, right=set(range(1, 11)),
    ))

    total = model.num_experts * model.num_moe_layers
    print(
        f"\nTable 3: {model.name} ({model.dtype}): one expert = {model.expert_bytes:,} bytes "
        f"({model.expert_bytes / GIB:.4f} GiB); dense weights = {model.dense_bytes:,} bytes "
        f"({model.dense_bytes / GIB:.3f} GiB); {model.num_moe_layers} MoE layers x {model.num_experts} experts "
        f"= {total} experts\n"
    )
    mx_rows = []
    for p in profiles:
        costs = p.cost_model(model)
        budget = p.expert_budget_bytes(model)
        fit = max(budget, 0) // model.expert_bytes
        mx_rows.append([
            f"`{p.name}`",
            f"{costs.transfer_s() * 1e3:.3f}",
            f"{costs.gpu_expert_s(1) * 1e3:.3f}",
            f"{costs.transfer_s() / costs.gpu_expert_s(1):.0f}x",
            _g(p.gpu.reserve_gib),
            f"{budget / GIB:.2f}",
            str(fit),
            f"{fit / total:.0%}",
        ])
    print(_table(
        ["preset", "transfer of one expert, ms", "GPU time of one expert, 1 token, ms", "transfer / GPU time",
         "reserve GiB", "HBM left for the cache GiB", "experts that fit", "of all experts"],
        mx_rows, right={1, 2, 3, 4, 5, 6, 7},
    ))

    print("\nSources (each preset's `references`):\n")
    for p in profiles:
        print(f"- `{p.name}`:")
        for ref in p.references:
            print(f"  - {ref}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
