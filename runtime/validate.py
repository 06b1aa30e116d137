"""Measured against predicted (docs/design.md section 7): run a policy for real, record the run, replay the
recording in the simulator with the same policy and a profile calibrated on this machine, and set the
two side by side.

    python -m runtime.validate --model M --policy SPEC (--cache-experts N | --cache-per-layer K)
        --link L [--profile profile.json] [--prompts FILE] [--max-new-tokens N] [--out-dir DIR]

Accesses, misses, prefetches, CPU experts, bytes and dropped/substituted mass must be equal (the
engines share the policy object's decisions and the counting; the policy gets the profile's cost
model in both); how hits split between landed and in-flight experts is timing and is only reported;
TTFT and TPOT are reported with the prediction's relative error. This is the one module
of the runtime that calls into the simulator (`sim`, never `simpy` itself).
"""

from __future__ import annotations

from runtime._extra import require

if __name__ == "__main__":
    require("runtime.validate")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from lab.cache import CacheConfig  # noqa: E402
from lab.hardware import HardwareError, HardwareProfile, load_profile  # noqa: E402
from policies import CacheError, Future, PolicyLike, PolicySpecError, as_policy, load_plugins  # noqa: E402
from policies.costs import variant_bytes  # noqa: E402
from runtime.calibrate import calibrate  # noqa: E402
from runtime.cli import add_model_options, cache_sizes, check_out, positive, runtime_parser  # noqa: E402
from runtime.links import LinkError  # noqa: E402
from runtime.memory import MemoryError_  # noqa: E402
from runtime.models import ModelError  # noqa: E402
from runtime.offload import OffloadError  # noqa: E402
from runtime.record import RecordError, read_prompts, record  # noqa: E402
from sim.replay import ReplayError, replay  # noqa: E402
from traces.io import TraceError, write_text_atomic  # noqa: E402

# what the policy decided: equal in both engines (hits + inflight_hits = accesses - misses is, too)
EXACT = ("accesses", "misses", "prefetches", "wasted_prefetches", "cpu_experts", "bytes_h2d", "dropped_mass",
         "substituted_mass", "layer_calls", "steps")
# how the resident accesses split between landed and still-copying experts: timing, so it may differ
# between the engines when a policy prefetches (demand policies have no in-flight hits in either)
SPLIT = ("hits", "inflight_hits")
TIMED = ("ttft_s", "tpot_s")
DEFAULT_PROMPTS = [
    "Mixture-of-experts models route every token to a few experts.",
    "When the experts do not fit in GPU memory, they are copied in on demand over PCIe.",
    "A policy decides which experts stay resident, which are prefetched and which are evicted.",
]


def validate(
    model: str,
    policy: PolicyLike,
    *,
    cache_experts: int | None = None,
    cache_per_layer: int | None = None,
    cache_gb: float | None = None,
    link: str = "emulated:16GB/s",
    profile: str | HardwareProfile | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 16,
    out_dir: str | Path = "validation",
    device: str = "cpu",
    progress: bool = False,
    batch_size: int = 1,
    dtype: str | None = None,
    pin_gb: float | None = None,
) -> dict[str, Any]:
    """`policy` is a spec string, a Policy subclass or an instance (registered: `policies.as_policy`);
    each run (calibration, an oracle's exact run, the measured run, the replay) gets a fresh copy."""
    pol = as_policy(policy)
    policy = pol.spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompts or DEFAULT_PROMPTS
    if profile is None:
        prof_path = out / "profile.json"
        write_text_atomic(prof_path, json.dumps(calibrate(model, link, device=device, policy=policy, dtype=dtype, pin_gb=pin_gb,
                                                              progress=progress), indent=2, sort_keys=True) + "\n")
        profile = str(prof_path)
    prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    future = None
    if pol.wants_future():  # an oracle repeats an exact run: record that first
        exact = out / "exact.jsonl.gz"
        record(model, prompts, exact, link=link, max_new_tokens=max_new_tokens, device=device, progress=progress,
               batch_size=batch_size, dtype=dtype, pin_gb=pin_gb)
        future = Future.from_trace(exact)
    trace = out / "run.jsonl.gz"
    measured = record(
        model, prompts, trace, policy=copy.deepcopy(pol), cache_experts=cache_experts, cache_per_layer=cache_per_layer,
        cache_gb=cache_gb, link=link,
        max_new_tokens=max_new_tokens, device=device, progress=progress, future=future, signals=False,
        batch_size=batch_size, dtype=dtype, pin_gb=pin_gb,
        costs=lambda spec: prof.cost_model(spec, variant_bytes(spec, pol)),  # what sim.replay gives the policy
    )
    predicted = replay(trace, copy.deepcopy(pol), CacheConfig(experts=cache_experts, per_layer=cache_per_layer, gb=cache_gb),
                       prof).metrics
    rows = []
    for key in EXACT + SPLIT + TIMED:
        m, p = measured.get(key), predicted.get(key)
        err = None
        if key in TIMED and m and p is not None:
            err = (p - m) / m
        rows.append({"metric": key, "measured": m, "predicted": p, "rel_error": err, "equal": m == p if key in EXACT else None})
    result = {
        "model": model,
        "policy": policy,
        "cache": {"experts": cache_experts, "per_layer": cache_per_layer, **({"gb": cache_gb} if cache_gb is not None else {})},
        "batch_size": batch_size,
        "memory": {k: v for k, v in measured.items() if k.startswith(("peak_", "host_tier_", "planned_", "device_budget"))},
        "link": link,
        "profile": prof.name,
        "trace": str(trace),
        "rows": rows,
        "counts_equal": all(r["equal"] for r in rows if r["equal"] is not None),
    }
    write_text_atomic(out / "validation.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _cache_text(cache: dict[str, Any]) -> str:
    if cache.get("per_layer") is not None:
        return f"{cache['per_layer']} slots per layer"
    return f"{cache.get('experts')} slots (global)"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, policy {result['policy']}, cache {_cache_text(result['cache'])}, link {result['link']}, "
        f"profile {result['profile']}",
        "",
        "| metric | measured | predicted | relative error |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        def fmt(x: Any, metric: str = r["metric"]) -> str:
            if x is None:
                return "n/a"
            if metric in TIMED:
                return f"{x * 1e3:.3f} ms"
            if isinstance(x, float):  # a fraction of the routing weight
                return f"{x:.6f}"
            return str(x)

        if r["equal"] is not None:
            err = "equal" if r["equal"] else "DIFFERENT"
        elif r["metric"] in SPLIT:
            err = "timing split"
        else:
            err = f"{r['rel_error']:+.1%}" if r["rel_error"] is not None else "n/a"
        lines.append(f"| {r['metric']} | {fmt(r['measured'])} | {fmt(r['predicted'])} | {err} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = runtime_parser("runtime.validate", __doc__)
    add_model_options(p, policy_default="lru", batch=True)
    p.add_argument("--profile", help="calibrated profile .json (default: calibrate now, into --out-dir)")
    p.add_argument("--prompts", help="prompts file (default: three built-in prompts)")
    p.add_argument("--max-new-tokens", type=positive, default=16, help="tokens generated per prompt")
    p.add_argument("--out-dir", default="validation", help="folder for the traces, the profile and validation.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "runtime.validate"
    if cache_sizes(args) != 1:
        print(f"{prog}: error: give exactly one of --cache-experts N, --cache-per-layer K and --cache-gb X", file=sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        check_out(Path(args.out_dir) / "validation.json")
        prompts = read_prompts(args.prompts) if args.prompts else None
        res = validate(
            args.model, args.policy, cache_experts=args.cache_experts, cache_per_layer=args.cache_per_layer,
            cache_gb=args.cache_gb, link=args.link,
            profile=args.profile, prompts=prompts, max_new_tokens=args.max_new_tokens, out_dir=args.out_dir, device=args.device,
            progress=True, batch_size=args.batch_size, dtype=args.dtype, pin_gb=args.pin_gb,
        )
    except (RecordError, ModelError, OffloadError, LinkError, PolicySpecError, CacheError, HardwareError, TraceError,
            ReplayError, MemoryError_) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(table(res))
    if not res["counts_equal"]:
        print(f"{prog}: the counts differ between the runtime and the simulator", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
