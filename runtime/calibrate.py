"""Measure this machine for the simulator: a calibrated hardware profile for one model and one link.

    python -m runtime.calibrate --model M --link L -o profile.json [--device cpu|cuda] [--policy SPEC]

What is measured, all in the offloaded runtime itself (so its own per-call overhead is part of what
the simulator is told):
- the link: copies of expert-sized and larger buffers through the link, fit to latency + bytes / bandwidth,
  plus what a miss costs the host beyond the copy (planning, issuing, waking up), found by comparing
  decode with every expert resident against decode with top_k slots per layer, added to the latency;
- on a GPU, every time on the host clock with no added device syncs (the runtime syncs where it
  reads the routing, once per layer): a layer's device work that has not finished when the host
  moves on is counted where the host next waits for it, so the parts add up to the step;
- per decoder layer, the time outside the experts (attention, router, norms, the policy's planning)
  as a function of the token count: prefill forwards of 2 .. 64 tokens, and decode steps of one token
  against a KV cache, as generation runs them (time spent waiting for copies is left out);
- one expert on the GPU (the compute device) and on the CPU, as functions of its token rows;
- the per-step rest (embeddings, LM head, sampling, the framework);
- the device's memory bandwidth (a large copy) and matmul throughput (for the profile's record).

The output validates as `lab.hardware.HardwareProfile` with `source: "calibrated"` and a `fit` for
this model, which `python -m sim.replay --hardware profile.json` accepts.
"""

from __future__ import annotations

from runtime._extra import require

if __name__ == "__main__":
    require("runtime.calibrate")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from policies import PolicySpecError, load_plugins, make_policy  # noqa: E402
from policies.costs import ComputeCost, CostModel  # noqa: E402
from runtime.cli import InputError, add_model_options, check_out, positive, runtime_parser  # noqa: E402
from runtime.links import Copy, LinkError, make_link, parse_link  # noqa: E402
from runtime.loader import open_model, skeleton  # noqa: E402
from runtime.memory import MemoryError_  # noqa: E402
from runtime.models import ModelError  # noqa: E402
from runtime.offload import OffloadError, OffloadSession, _expert_math  # noqa: E402
from traces.io import write_text_atomic  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64)


def _fit(points: list[tuple[float, float]]) -> dict[str, Any]:
    """The measured curve (`points`, which the simulator interpolates) and, for reading, the least
    squares line t = fixed + per_token * n through it (both clipped at zero)."""
    n = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    pts = [[int(a), max(float(b), 0.0)] for a, b in points]
    if len(set(n.tolist())) < 2:
        return {"fixed_s": float(max(t.mean(), 0.0)), "per_token_s": 0.0, "floor_s": 0.0, "points": pts}
    a = np.vstack([np.ones_like(n), n]).T
    (fixed, slope), *_ = np.linalg.lstsq(a, t, rcond=None)
    if slope < 0:
        fixed, slope = float(t.mean()), 0.0
    if fixed < 0:
        fixed, slope = 0.0, float((n @ t) / (n @ n))
    return {"fixed_s": float(fixed), "per_token_s": float(slope), "floor_s": 0.0, "points": pts}


def _median_by_n(samples: list[tuple[int, float]]) -> list[tuple[float, float]]:
    by: dict[int, list[float]] = {}
    for n, t in samples:
        by.setdefault(n, []).append(t)
    return [(float(n), float(np.median(ts))) for n, ts in sorted(by.items())]


def measure_link(link_spec: str, nbytes: int, device: torch.device, repeats: int = 5, pinned: bool | None = None) -> dict[str, float]:
    """Copies of 1x, 4x and 16x an expert's bytes; fit to latency + bytes / bandwidth. The source
    buffers are page-locked on CUDA unless `pinned=False` (the pageable figure)."""
    pin = device.type == "cuda" if pinned is None else pinned
    link = make_link(link_spec, device)
    samples: list[tuple[float, float]] = []
    try:
        for mult in (1, 4, 16):
            n = max(nbytes * mult // 4, 1)
            src = torch.ones(n, dtype=torch.float32, pin_memory=pin)
            dst = torch.empty(n, dtype=torch.float32, device=device)
            for _ in range(repeats):
                cp = Copy((0, 0), src, dst, urgent=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter_ns()
                link.submit(cp)
                if device.type == "cuda":
                    cp.done.synchronize()
                else:
                    cp.done.wait()
                samples.append((float(n * 4), (time.perf_counter_ns() - t0) / 1e9))
    finally:
        link.close()
    f = _fit(_median_by_n([(int(b), t) for b, t in samples]))
    bw = 1.0 / f["per_token_s"] if f["per_token_s"] > 0 else 1e15
    return {"latency_us": f["fixed_s"] * 1e6, "h2d_gbps": bw / 1e9}


def _device_speed(device: torch.device) -> tuple[float, float]:
    """(memory GB/s, matmul TFLOPS) of the compute device, roughly: for the profile's record."""
    x = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    a = torch.randn(512, 512, device=device)

    def timed(fn, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / reps

    mem = 2 * x.numel() * 4 / timed(lambda: y.copy_(x)) / 1e9
    flops = 2 * 512**3 / timed(lambda: a @ a) / 1e12
    return mem, flops


def calibrate(model_name: str, link: str, *, device: str = "cpu", repeats: int = 3, policy: str = "lru",
              dtype: str | torch.dtype | None = None, pin_gb: float | None = None, progress: bool = False) -> dict[str, Any]:
    """The profile, measured with `policy` planning every call (every expert resident, or as many
    per layer as the device holds: the model is opened with its experts in the host tier, memory
    checked first), so that its per-call host work (planning, the signals it reads: look-ahead
    routing, probabilities) is part of the measured per-layer time; an oracle policy is measured as
    `lru`. `progress`: a bar over the measurement stages on stderr."""
    parse_link(link)
    if make_policy(policy).wants_future():
        policy = "lru"
    spec0 = skeleton(model_name, None)[1]
    if spec0 is None:
        raise OffloadError(f"{model_name}: the model has no MoE layer that dispatches through transformers' experts registry: nothing to calibrate")
    opened = open_model(model_name, dtype=dtype, device=device, pin_gb=pin_gb, cache_per_layer=spec0.num_experts,
                        prompts=["x" * 64], new_tokens=24, shrink_to_fit=True)
    model, name, dev = opened.model, opened.name, opened.device
    per_layer = int(opened.cache_per_layer or spec0.num_experts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=3 * (repeats + 1) + 3, desc=f"calibrate {name}", unit=" stage", file=sys.stderr, disable=None)

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    # a provisional cost model for policies that weigh costs (`fiddler`): with every expert resident
    # they never act on it, but they refuse to start without one
    provisional = CostModel(0.0, 25e9, {"full": 1}, ComputeCost(), ComputeCost(1e-4), ComputeCost(1e-3))
    session = OffloadSession(model, policy, cache_per_layer=per_layer, link=link, name=name,
                             costs=provisional)
    spec = session.spec
    layer_ns: dict[int, int] = {}
    starts: dict[int, int] = {}
    hooks = []
    decoder = _decoder_layers(model)

    def pre(i: int):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, args: Any) -> None:
            starts[i] = time.perf_counter_ns()

        return hook

    def post(i: int):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            layer_ns[i] = layer_ns.get(i, 0) + time.perf_counter_ns() - starts[i]

        return hook

    for i, layer in enumerate(decoder):
        hooks += [layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post(i))]
    dense_samples: list[tuple[int, float]] = []
    step_samples: list[tuple[int, float]] = []
    expert_samples: list[tuple[int, float]] = []
    timing = {"on": False, "stall": 0}

    def on_step(st: Any) -> None:
        """One forward done: split its time into layers' dense parts, experts and the step's rest."""
        if timing["on"] and (st.phase == "decode" or st.tokens > 1):
            layers_total = sum(layer_ns.values())
            expert_total = sum(t for _, t in session.expert_times or [])
            stall = session.stall_ns - timing["stall"]  # a copy waited for is not compute
            dense_samples.append((st.tokens, (layers_total - expert_total - stall) / len(decoder) / 1e9))
            step_samples.append((st.tokens, (st.end_ns - st.start_ns - layers_total) / 1e9))
            expert_samples.extend((k, t / 1e9) for k, t in session.expert_times or [])
        layer_ns.clear()
        session.expert_times = []
        timing["stall"] = session.stall_ns

    session.on_step = on_step
    session.install()
    session.preload()  # every expert resident: the timed runs never miss
    try:
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        for rep in range(repeats + 1):  # the first round warms up and is dropped
            # prefill: a fresh forward of n tokens (no KV cache), after an untimed one that loads its experts
            for n in TOKENS[1:]:
                ids = torch.randint(3, vocab, (1, n), generator=g).to(dev)
                with torch.no_grad():
                    timing["on"] = False
                    model(ids)
                    timing["on"] = rep > 0
                    model(ids)
            # decode: one token at a time against a KV cache, as generation runs
            ids = torch.randint(3, vocab, (1, 16), generator=g).to(dev)
            with torch.no_grad():
                timing["on"] = False
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
                timing["on"] = rep > 0
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                               do_sample=False, pad_token_id=0)
            timing["on"] = False
            tick()
    finally:
        for h in hooks:
            h.remove()
        session.uninstall()
    cpu_samples = _cpu_expert_samples(session, repeats)
    tick()
    link_fit = measure_link(link, spec.expert_bytes, dev)
    store = session.store
    pageable = link_fit["h2d_gbps"]
    if dev.type == "cuda":  # the host tier's pageable part (beyond --pin-gb) is copied at this rate
        pageable = measure_link(link, spec.expert_bytes, dev, pinned=False)["h2d_gbps"]
    tick()
    link_fit["latency_us"] += _per_miss_overhead_us(model, name, link, link_fit, spec.expert_bytes, spec.top_k, repeats,
                                                    per_layer, tick)
    mem_gbps, tflops = _device_speed(dev)
    tick()
    if bar is not None:
        bar.close()
    cpu_mem, cpu_tflops = _device_speed(torch.device("cpu")) if dev.type == "cuda" else (mem_gbps, tflops)
    ls = parse_link(link)
    hbm = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else _host_gib()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "name": f"calibrated-{name.replace('/', '_')}-{ls.kind}",
        "description": f"measured by runtime.calibrate on {dev_name} for {name}, link {ls}, policy {policy}",
        "source": "calibrated",
        "references": [f"python -m runtime.calibrate --model {model_name} --link {link} --device {device} --policy '{policy}'"],
        "link": {
            "h2d_gbps": link_fit["h2d_gbps"],
            "d2h_gbps": link_fit["h2d_gbps"],
            "latency_us": max(link_fit["latency_us"], 0.0),
            "copy_engines": 1,
            # an emulated link charges the same for pinned and pageable buffers; on CUDA both were measured
            "pinned": dev.type == "cuda" and store.pinned_fraction >= 1.0,
            "pinned_fraction": store.pinned_fraction if dev.type == "cuda" else 1.0,
            "pageable_gbps": pageable,
            "theoretical_gbps": (ls.bandwidth_Bps / 1e9) if ls.bandwidth_Bps else None,
        },
        "gpu": {"name": dev_name, "hbm_gib": hbm, "reserve_gib": 0.0, "peak_tflops": tflops, "hbm_gbps": mem_gbps,
                "flops_efficiency": 1.0, "hbm_efficiency": 1.0, "expert_overhead_us": 0.0, "dense_overhead_us": 0.0},
        "cpu": {"name": platform.processor() or platform.machine(), "peak_gflops": cpu_tflops * 1e3, "mem_gbps": cpu_mem,
                "dram_gib": _host_gib(), "flops_efficiency": 1.0, "mem_efficiency": 1.0, "expert_overhead_us": 0.0},
        "fit": {
            "model": spec.name,
            "dense": _fit(_median_by_n(dense_samples)),
            "gpu_expert": _fit(_median_by_n(expert_samples)),
            "cpu_expert": _fit(_median_by_n(cpu_samples)),
            "step": _fit(_median_by_n(step_samples)),
        },
    }


def _decode_tpot(model: nn.Module, name: str, link: str, per_layer: int, repeats: int, tick: Any = None) -> tuple[float, float]:
    """(median decode step seconds, misses per decode step) of greedy generation at a cache size."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=g).to(next(model.parameters()).device)
    tpots, misses = [], []
    for rep in range(repeats + 1):
        s = OffloadSession(model, "lru", cache_per_layer=per_layer, link=link, name=name)
        before: list[int] = []
        s.on_step = lambda st, s=s, before=before: before.append(s.counters.misses)  # type: ignore[misc]
        s.install()
        try:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                               do_sample=False, pad_token_id=0)
        finally:
            s.uninstall()
        if tick is not None:
            tick()
        decode = [st for st in s.steps if st.phase == "decode"]
        if rep and decode:
            tpots.append(float(np.median([(st.end_ns - st.start_ns) / 1e9 for st in decode])))
            misses.append((before[-1] - before[0]) / max(len(decode), 1))
    return float(np.median(tpots)), float(np.median(misses))


def _per_miss_overhead_us(model: nn.Module, name: str, link: str, link_fit: dict[str, float], nbytes: int, top_k: int,
                          repeats: int, resident: int, tick: Any = None) -> float:
    """What a miss costs the host beyond the copy itself (planning the load, handing it to the link,
    waking up when it lands), from decode with every expert resident against decode with top_k
    slots per layer; the simulator charges it as part of each copy's latency."""
    full_tpot, full_per_step = _decode_tpot(model, name, link, resident, repeats, tick)
    small_tpot, per_step = _decode_tpot(model, name, link, top_k, repeats, tick)
    per_step -= full_per_step  # a device too small for every expert misses at `resident` slots too
    if per_step <= 0:
        return 0.0
    copy_s = link_fit["latency_us"] * 1e-6 + nbytes / (link_fit["h2d_gbps"] * 1e9)
    return max((small_tpot - full_tpot) / per_step - copy_s, 0.0) * 1e6


def _cpu_expert_samples(session: OffloadSession, repeats: int) -> list[tuple[int, float]]:
    """One expert computed on the host from the slow tier, for CPU execution of misses."""
    ex = session.layers[0].experts
    views = session.store.views(session.store.buffers[(0, 0)])
    out: list[tuple[int, float]] = []
    for rep in range(repeats + 1):
        for n in TOKENS:
            x = torch.randn(n, session.spec.hidden_size, dtype=session.store.dtype)
            t0 = time.perf_counter_ns()
            with torch.no_grad():
                _expert_math(ex, views, x)
            if rep:
                out.append((n, (time.perf_counter_ns() - t0) / 1e9))
    return out


def _num_experts(model: nn.Module) -> int:
    return int(next(m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")).num_experts)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == model.config.num_hidden_layers:
            return list(layers)
    raise OffloadError("cannot find the model's decoder layers (a ModuleList named 'layers')")


def _host_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 1.0


def build_parser() -> argparse.ArgumentParser:
    p = runtime_parser("runtime.calibrate", __doc__)
    add_model_options(p, policy_default="lru", cache=False)
    p.add_argument("--repeats", type=positive, default=3, help="timed rounds of every measurement (after one warm-up round)")
    p.add_argument("-o", "--out", type=Path, required=True, help="profile to write (.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_plugins(args.plugin)
        check_out(args.out)
        prof = calibrate(args.model, args.link, device=args.device, repeats=args.repeats, policy=args.policy,
                         dtype=args.dtype, pin_gb=args.pin_gb, progress=not args.no_progress)
    except (ModelError, OffloadError, LinkError, PolicySpecError, MemoryError_, InputError) as exc:
        print(f"runtime.calibrate: error: {exc}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, json.dumps(prof, indent=2, sort_keys=True) + "\n")
    f = prof["fit"]
    print(f"wrote {args.out}")
    print(f"link    {prof['link']['h2d_gbps']:.3f} GB/s, {prof['link']['latency_us']:.1f} us latency")
    for k in ("dense", "gpu_expert", "cpu_expert", "step"):
        print(f"{k:<10} {f[k]['fixed_s'] * 1e6:9.1f} us + {f[k]['per_token_s'] * 1e6:8.3f} us/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
