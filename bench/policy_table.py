"""Every policy side by side: the simulator on the real Mixtral trace and on the zoo traces, and the
runtime's quality cost of the lossy policies on the trained zoo models.

    python bench/policy_table.py                       # all three sections (about 3 min on 2 cores)
    python bench/policy_table.py --section mixtral     # one section: mixtral, zoo or quality
    python bench/policy_table.py --section quality --blocks 1

Prints Markdown tables (progress goes to stderr):

1. `mixtral`: `traces/mixtral-8x7b-gsm8k.jsonl.gz` replayed (`sim.replay.replay`) under every spec of
   `SPECS` on the `rtx4090` datasheet profile with 2, 4 and 6 experts cached per layer: hit rate,
   TPOT, speedup (`lru`'s TPOT at the same cache over the spec's), bytes moved, the share of the
   time the link is busy copying, dropped and substituted routing mass, prefetches and experts run
   on the CPU; above it the cost model's copy and expert times and the cache sizes. A spec that
   needs a trace field the trace lacks (or a header item, refused when the policy starts) is listed
   as refused at the end of the table.
2. `zoo`: the same on `traces/zoo-coarse.jsonl.gz` (8 experts, top-2: 3, 4, 6 per layer) and
   `traces/zoo-fine.jsonl.gz` (32 experts, top-4: 8, 12, 16 per layer), recorded from the trained
   zoo models with `probs`, `lookahead` and `importance`, so every spec runs. The profile is the same
   `rtx4090`, with the zoo models' own (tiny) expert bytes and dimensions from the trace headers.
3. `quality`: the zoo models `zoo:coarse` and `zoo:fine` offloaded in the runtime (`runtime.offload`,
   a fixed per-layer cache of 4 and 12, an emulated link) under each lossy family at a sweep of
   thresholds, reading the first `--blocks` held-out blocks of 256 tokens (`runtime.zoo.corpus`, the
   blocks the training log's held-out perplexity is measured on) teacher-forced, one decode call
   per token (`runtime.quality.teacher_forced`): misses, bytes against `lru` at the same cache,
   dropped and substituted mass, perplexity, its change against the exact model (also as the mean
   per-token change of the negative log-likelihood in nats, with its standard error over the
   tokens: how far the change stands out from the noise of a short text), and the KL divergence of
   the next-token distributions from the exact model's.

`SPECS` is `VARIANTS`, hand-picked parameter variants, and every built-in policy they do not name,
in its default form (`all_specs`): a new policy file in `policies/` is in the tables with no edit here
(regenerate docs/policies.md with this script).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.cache import CacheConfig  # noqa: E402
from lab.hardware import GIB, HardwareProfile, load_profile  # noqa: E402
from policies import REGISTRY, PolicySpecError, parse_spec  # noqa: E402
from sim.replay import ReplayError, replay  # noqa: E402
from traces.io import read_header  # noqa: E402

HARDWARE = "rtx4090"
TRACES = {
    "mixtral": ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz",
    "coarse": ROOT / "traces" / "zoo-coarse.jsonl.gz",
    "fine": ROOT / "traces" / "zoo-fine.jsonl.gz",
}
SIZES = {"mixtral": (2, 4, 6), "coarse": (3, 4, 6), "fine": (8, 12, 16)}

# The hand-picked parameter variants. Lossless first, then lossy; the first spec is the baseline every
# speedup is measured against. A built-in policy none of them names is added in its default form by
# `all_specs` (so a new policy file is compared with no edit here).
VARIANTS: list[str] = [
    "lru",
    "lfu",
    "fifo",
    "random",
    "belady",
    "static",
    "lru+lookahead",
    "moe-infinity",
    "moe-infinity(window=32)",
    "lru+fiddler",
    "lru+adaptive-k(threshold=0.1)",
    "lru+adaptive-k(threshold=0.3)",
    "mobile(threshold=0.2)",
    "mobile(threshold=0.35)",
    "mobile(threshold=0.5)",
    "mobile(threshold=0.35, prefetch=2)",
    "mobile(metric=entropy, threshold=0.5)",
    "mobile(metric=importance, threshold=0.3)",
    "substitute(threshold=0.3)",
    "substitute(threshold=0.5)",
    "substitute(threshold=0.5, similarity=probs)",
    "substitute(threshold=0.5, similarity=weights)",
    "buddy",
    "hobbit(threshold=0.3)",
    "hobbit(bits=8, threshold=0.3)",
    "hobbit(threshold=0.3, upgrade=False)",
    "hobbit(threshold=1.0)",
]



def all_specs(variants: Iterable[str] = VARIANTS) -> list[str]:
    """`variants`, and every built-in policy they do not name, in its default form: a lossless one
    after the last lossless variant, a lossy one at the end."""
    from policies import make_policy
    from policies.base import is_builtin

    variants = list(variants)
    named = {name for spec in variants for name, _ in parse_spec(spec)}
    extra = [n for n in sorted(REGISTRY) if is_builtin(REGISTRY[n]) and n not in named]
    lossless = [s for s in variants if make_policy(s).lossless]
    at = variants.index(lossless[-1]) + 1 if lossless else 0
    new_lossless = [n for n in extra if make_policy(n).lossless]
    return variants[:at] + new_lossless + variants[at:] + [n for n in extra if n not in new_lossless]


SPECS: list[str] = all_specs()

# The runtime quality sweep: family (a spec with {} for the threshold) -> thresholds, 0 first.
QUALITY_MODELS = {"coarse": 4, "fine": 12}  # zoo model -> experts cached per layer
QUALITY_FAMILIES: dict[str, tuple[float, ...]] = {
    "mobile(threshold={})": (0, 0.1, 0.2, 0.35, 0.5),
    "substitute(threshold={})": (0, 0.1, 0.3, 0.5, 1.0),
    "substitute(threshold={}, similarity=weights)": (0, 0.3, 0.5, 1.0),
    "buddy(threshold={})": (0, 0.3, 0.5, 1.0),
    "hobbit(threshold={})": (0, 0.1, 0.3, 0.5, 1.0),
    "hobbit(bits=8, threshold={})": (0, 0.1, 0.3, 0.5, 1.0),
    "lru+adaptive-k(threshold={})": (0, 0.1, 0.2, 0.3, 0.5),
}
QUALITY_LINK = "emulated:1000GB/s"  # the link's speed changes no decision and no logit
BLOCK = 256  # tokens per held-out block, the training block length


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_coverage(specs: Iterable[str]) -> None:
    """Every built-in policy (replacement or modifier) occurs in some spec (plugins are not compared)."""
    from policies.base import is_builtin

    named = {name for spec in specs for name, _ in parse_spec(spec)}
    missing = sorted({n for n, c in REGISTRY.items() if is_builtin(c)} - named)
    if missing:
        raise SystemExit(f"bench/policy_table.py: SPECS leaves out the registered policies {', '.join(missing)}")


def _num(x: float, digits: int = 4) -> str:
    """`digits` significant digits, never in exponent notation."""
    if x == 0:
        return "0"
    mag = len(str(int(abs(x)))) if abs(x) >= 1 else 0
    return f"{x:.{max(digits - mag, 0)}f}"


def simulate(trace: Path, sizes: Iterable[int], profile: HardwareProfile) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, list[str]]]:
    """Replay every spec at every size: (rows, refused spec -> reason, spec -> the replay's notes)."""
    rows: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    for size in sizes:
        base: float | None = None
        for spec in SPECS:
            if spec in refused:
                continue
            t0 = time.perf_counter()
            try:
                res = replay(trace, spec, CacheConfig(per_layer=size), profile)
            except (ReplayError, PolicySpecError) as exc:  # a missing trace field, or a header item refused at reset
                refused[spec] = str(exc).split("needs ", 1)[-1].split(", which")[0]
                log(f"  {trace.name} {spec}: refused ({refused[spec]})")
                continue
            m = res.metrics
            if spec == SPECS[0]:
                base = m["tpot_s"]
            assert base is not None
            rows.append({"spec": spec, "size": size, "metrics": m, "speedup": base / m["tpot_s"]})
            own = [n for n in res.notes if not n.startswith("the cache (")]
            if own and spec not in notes:
                notes[spec] = own
            log(f"  {trace.name} {spec} @{size}: {time.perf_counter() - t0:.2f} s")
    return rows, refused, notes


def print_sim_table(name: str, profile: HardwareProfile) -> None:
    trace = TRACES[name]
    model = read_header(trace).model
    big = model.expert_bytes > 1e8
    unit, scale = ("GB", 1e9) if big else ("MB", 1e6)
    log(f"{trace.name}: {len(SPECS)} specs x cache {SIZES[name]} on {profile.name}")
    rows, refused, notes = simulate(trace, SIZES[name], profile)
    costs = profile.cost_model(model)
    budget = profile.expert_budget_bytes(model)
    caches = ", ".join(f"{k}: {k * model.num_moe_layers * model.expert_bytes / GIB:.3g} GiB" if big
                       else f"{k}: {k * model.num_moe_layers * model.expert_bytes / 1e6:.3g} MB" for k in SIZES[name])
    print(f"{trace.name} ({model.num_experts} experts x top-{model.top_k}, {model.num_moe_layers} MoE layers, "
          f"expert {model.expert_bytes / 1e6:.3g} MB {model.dtype}) on `{profile.name}`: one expert's copy "
          f"{_num(costs.transfer_s('full') * 1e3)} ms, its GPU call for one token {_num(costs.gpu_expert_s(1) * 1e3)} ms, "
          f"on the CPU {_num(costs.cpu_expert_s(1) * 1e3)} ms; caches per size {caches} "
          f"({max(budget, 0) / GIB:.3g} GiB left for experts on the card)")
    print()
    print(f"| spec | cache/layer | hit rate | TPOT ms | speedup vs lru | {unit} moved | link busy | dropped | substituted | "
          "prefetches | CPU experts |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        m = r["metrics"]
        moved = f"{m['bytes_h2d'] / scale:.0f}" if big else f"{m['bytes_h2d'] / scale:.2f}"
        print(f"| `{r['spec']}` | {r['size']} | {m['hit_rate']:.3f} | {_num(m['tpot_s'] * 1e3)} | {r['speedup']:.2f}x | "
              f"{moved} | {m['link_busy_frac']:.2f} | {m['dropped_mass']:.3f} | {m['substituted_mass']:.3f} | {m['prefetches']} | "
              f"{m['cpu_experts']} |")
    for spec, reason in refused.items():
        print(f"| `{spec}` | any | cannot run: needs {reason} | - | - | - | - | - | - | - | - |")
    if notes:
        print()
        for spec, own in notes.items():
            print(f"- `{spec}`: " + "; ".join(own))
    print()


# -- runtime quality --------------------------------------------------------------------------------
def quality_rows(name: str, cache_per_layer: int, n_blocks: int, families: dict[str, tuple[float, ...]] | None = None,
                 block: int = BLOCK) -> tuple[list[dict[str, Any]], int, float]:
    """`lru`, then per family (default `QUALITY_FAMILIES`) and threshold: the run's counts (`metrics`)
    and its `runtime.quality.Quality` on the first `n_blocks` held-out blocks of `block` tokens of
    `zoo:NAME`; with the number of predicted tokens and the exact model's perplexity."""
    from runtime.models import load_model
    from runtime.offload import offload
    from runtime.quality import compare, teacher_forced
    from runtime.zoo.corpus import held_out_blocks

    model, path = load_model(f"zoo:{name}")
    model.set_experts_implementation("eager")  # the offloaded layers run eager: bit-equal when lossless
    ids = held_out_blocks(path, length=block, max_blocks=n_blocks)
    if ids.shape[0] < n_blocks:
        raise SystemExit(f"bench/policy_table.py: the held-out split has only {ids.shape[0]} blocks of {block} tokens")
    t0 = time.perf_counter()
    exact = teacher_forced(model, ids)
    log(f"  zoo:{name} exact: {time.perf_counter() - t0:.1f} s")
    families = QUALITY_FAMILIES if families is None else families
    specs = ["lru"] + [fam.format(t) for fam, grid in families.items() for t in grid]
    rows: list[dict[str, Any]] = []
    q0 = None
    for spec in specs:
        t0 = time.perf_counter()
        with offload(model, spec, cache_per_layer=cache_per_layer, link=QUALITY_LINK, name=path) as session:
            logits = teacher_forced(model, ids)
        q = compare(exact, logits, ids)
        q0 = q0 or q
        rows.append({"spec": spec, "metrics": dict(session.metrics), "quality": q})
        log(f"  zoo:{name} {spec}: {time.perf_counter() - t0:.1f} s")
    assert q0 is not None
    return rows, q0.tokens, q0.perplexity_exact


def print_quality(n_blocks: int) -> None:
    for name, size in QUALITY_MODELS.items():
        log(f"zoo:{name}: {1 + sum(len(g) for g in QUALITY_FAMILIES.values())} runs, {n_blocks} x {BLOCK} held-out tokens")
        rows, tokens, ppl_exact = quality_rows(name, size, n_blocks)
        lru_bytes = rows[0]["metrics"]["bytes_h2d"]
        print(f"zoo:{name}, {size} experts cached per layer, {n_blocks} held-out blocks of {BLOCK} tokens read one decode "
              f"call per token ({tokens} predicted tokens; exact model: perplexity {ppl_exact:.3f}):")
        print()
        print("| spec | misses | bytes vs lru | dropped | substituted | perplexity | change | NLL change ± s.e. | KL(exact‖run) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            m, q = r["metrics"], r["quality"]
            change = q.perplexity_change
            rel = 100 * change / q.perplexity_exact
            print(f"| `{r['spec']}` | {m['misses']} | {m['bytes_h2d'] / lru_bytes:.2f} | {m['dropped_mass']:.3f} | "
                  f"{m['substituted_mass']:.3f} | {q.perplexity:.3f} | {change:+.3f} ({rel:+.1f}%) | "
                  f"{q.nll_change:+.4f} ± {q.nll_change_se:.4f} | {q.kl:.2e} |")
        print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/policy_table.py", description=__doc__.splitlines()[0])
    p.add_argument("--section", action="append", choices=["mixtral", "zoo", "quality"],
                   help="a section to print (repeatable; default all three)")
    p.add_argument("--blocks", type=int, default=2, help="held-out blocks of 256 tokens for the quality runs (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the quality runs (default 1)")
    args = p.parse_args(argv)
    if args.blocks < 1 or args.threads < 1:
        p.error("--blocks and --threads must be >= 1")
    sections = args.section or ["mixtral", "zoo", "quality"]
    check_coverage(SPECS)
    t0 = time.perf_counter()
    profile = load_profile(HARDWARE)
    if "mixtral" in sections:
        print_sim_table("mixtral", profile)
    if "zoo" in sections:
        for name in ("coarse", "fine"):
            print_sim_table(name, profile)
    if "quality" in sections:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(args.threads)  # tiny matrices: one thread is as fast, and steady on a shared machine
        print_quality(args.blocks)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
