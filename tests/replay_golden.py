"""Reference outputs of `sim.replay` on a fixed set of traces, policies, cache sizes and hardware.

    python tests/replay_golden.py capture FOLDER [--quick]   # run every case, write FOLDER/manifest.json
    python tests/replay_golden.py compare A B                 # the cases whose outputs differ

Each case is one `python -m sim.replay` command (run in-process through `sim.replay.main`) with
`--out`, `--timeline` and `--chrome-trace`; the manifest holds the sha256 of each output and of the
printed summary. It exists so that a change meant to make replays faster (a columnar trace, fewer
SimPy events) can be held to the outputs of the code before it: capture on the old commit, capture
on the new one, compare. The plotly HTML names its div with a random uuid, which is blanked before
hashing; everything else is compared byte for byte.

The traces are the shipped ones and synthetic ones of the kinds the test suite writes (decode-only
top-1 and top-2, prefill chunks with a perfect look-ahead, calls that need more experts than the
cache holds), written here from fixed seeds so that every capture sees the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHIPPED = ["mixtral-8x7b-gsm8k.jsonl.gz", "mixtral-8x7b-humaneval.jsonl.gz", "zoo-coarse.jsonl.gz", "zoo-fine.jsonl.gz"]
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- synthetic traces -------------------------------------------------------------------------------
def _steps(rng: random.Random, layers: int, experts: int, top_k: int, n_steps: int, prefill_every: int = 0,
           prefill_tokens: int = 4, skew: float = 1.2) -> list[tuple[str, list[tuple[list[list[int]], list[list[float]]]]]]:
    """Zipf-skewed routing with a fixed popularity order per layer, a prefill call of
    `prefill_tokens` rows every `prefill_every` steps (the test suite's `random_steps`)."""
    weights_e = [1.0 / (i + 1) ** skew for i in range(experts)]
    steps = []
    for s in range(n_steps):
        prefill = prefill_every > 0 and s % prefill_every == 0
        tokens = prefill_tokens if prefill else 1
        calls = []
        for layer in range(layers):
            perm = list(range(experts))
            random.Random(layer).shuffle(perm)
            rows, ws = [], []
            for _ in range(tokens):
                ids: list[int] = []
                while len(ids) < top_k:
                    e = perm[rng.choices(range(experts), weights_e)[0]]
                    if e not in ids:
                        ids.append(e)
                raw = sorted((rng.random() + 0.05 for _ in ids), reverse=True)
                rows.append(ids)
                ws.append([x / sum(raw) for x in raw])
            calls.append((rows, ws))
        steps.append(("prefill" if prefill else "decode", calls))
    return steps


def _write_steps(path: Path, model, steps, lookahead: int = 0) -> Path:  # type: ignore[no-untyped-def]
    from traces.io import TraceWriter
    from traces.schema import Fields, Header, LayerRecord, Recording, StepRecord

    header = Header(model=model, recording=Recording(prompt_source="golden"), fields=Fields(lookahead=lookahead > 0))
    n_layers = model.num_moe_layers
    with TraceWriter(path, header) as w:
        for s, (phase, layers) in enumerate(steps):
            for layer, (rows, ws) in enumerate(layers):
                look = None
                if lookahead:
                    look = {str(x): layers[x][0] for x in range(layer + 1, min(layer + lookahead, n_layers - 1) + 1)}
                w.write(LayerRecord(step=s, phase=phase, layer=layer, tokens=len(rows), topk=rows, weights=ws, lookahead=look))
            w.write(StepRecord(step=s, phase=phase, seq_ids=[0]))
    return path


def _toy_profile(folder: Path, *, latency: float, dense: float, gpu: float, cpu_fixed: float, cpu_per_token: float,
                 name: str, engines: int = 1) -> str:
    from sim.hardware import load_profile

    prof = load_profile("rtx4090").model_dump()
    prof.update(name=name, source="calibrated")
    prof["link"].update(latency_us=latency * 1e6, h2d_gbps=1e9, d2h_gbps=1e9, copy_engines=engines)
    zero = {"fixed_s": 0.0, "per_token_s": 0.0, "floor_s": 0.0}
    prof["fit"] = {"model": "toy", "dense": {**zero, "fixed_s": dense}, "gpu_expert": {**zero, "fixed_s": gpu},
                   "cpu_expert": {**zero, "fixed_s": cpu_fixed, "per_token_s": cpu_per_token}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(prof, sort_keys=True))
    return str(path)


def synthetic(folder: Path) -> dict[str, str]:
    """Write the synthetic traces and toy profiles; returns their paths by name."""
    from traces.synthetic import iid_calls, toy_model, write_trace, zipf_probs

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    p = folder / "iid2x8k2.jsonl"
    write_trace(p, toy_model(num_layers=2, num_experts=8, top_k=2), iid_calls([1.0] * 8, 400, num_layers=2, top_k=2, seed=3))
    out["iid2x8k2"] = str(p)
    p = folder / "zipf1x16k1.jsonl.gz"
    write_trace(p, toy_model(num_layers=1, num_experts=16, top_k=1), iid_calls(zipf_probs(16, 0.9), 600, seed=1))
    out["zipf1x16k1"] = str(p)
    m = toy_model(num_layers=4, num_experts=8, top_k=2, expert_bytes=1000)
    out["prefill4x8"] = str(_write_steps(folder / "prefill4x8.jsonl", m, _steps(random.Random(5), 4, 8, 2, 120, prefill_every=20), 2))
    m = toy_model(num_layers=3, num_experts=8, top_k=2, expert_bytes=1000)
    out["reuse3x8"] = str(_write_steps(folder / "reuse3x8.jsonl", m,
                                       _steps(random.Random(20), 3, 8, 2, 24, prefill_every=4, prefill_tokens=6), 2))
    out["hw-toy"] = _toy_profile(folder, latency=1e-4, dense=2e-4, gpu=5e-5, cpu_fixed=2e-5, cpu_per_token=4e-5, name="hw-toy")
    out["hw-slow"] = _toy_profile(folder, latency=1e-3, dense=1e-4, gpu=1e-4, cpu_fixed=1e-3, cpu_per_token=0.0, name="hw-slow")
    out["hw-2ce"] = _toy_profile(folder, latency=3e-4, dense=1e-4, gpu=5e-5, cpu_fixed=1e-4, cpu_per_token=1e-5,
                                 name="hw-2ce", engines=2)
    return out


# -- cases ------------------------------------------------------------------------------------------
MIXTRAL_POLICIES = ["lru", "lfu", "lfu(decay=0.9)", "fifo", "random(seed=0)", "belady", "static", "lru+lookahead(depth=2, budget=3)",
                    "moe-infinity(budget=3)", "lru+fiddler", "adaptive-k(threshold=0.3)", "hobbit", "substitute", "buddy"]
ZOO_POLICIES = ["lru", "lfu", "belady", "lru+lookahead(depth=2, budget=3)", "lru+lookahead(predictor=lookahead)",
                "moe-infinity", "lru+fiddler", "adaptive-k", "hobbit(bits=8)", "mobile", "mobile(metric=entropy, prefetch=2)",
                "mobile(metric=importance, threshold=0.5)", "substitute(similarity=weights)", "substitute(similarity=probs)",
                "buddy(evict=lfu)", "static(scratch=3)"]
TOY_POLICIES = ["lru", "lfu", "fifo", "random(seed=1)", "belady", "static", "lru+lookahead(depth=2, budget=3)",
                "lru+lookahead(depth=2, budget=4)", "moe-infinity(budget=3)", "lru+fiddler", "adaptive-k(threshold=0.3)",
                "hobbit", "mobile", "substitute", "buddy"]


def cases(folder: Path, quick: bool = False) -> list[tuple[str, list[str]]]:
    """(name, argv after `python -m sim.replay`) for every case."""
    syn = synthetic(folder / "traces")
    out: list[tuple[str, list[str]]] = []

    def add(trace: str, policy: str, size: list[str], hw: str | None = None, extra: list[str] | None = None) -> None:
        argv = [trace, "--policy", policy, *size, "--no-progress", *(["--hardware", hw] if hw else []), *(extra or [])]
        out.append((" ".join(argv).replace(str(folder), "$F").replace(str(ROOT) + "/", ""), argv))

    shipped = [str(ROOT / "traces" / t) for t in SHIPPED]
    mixtral_sizes = [["--cache-per-layer", "2"], ["--cache-per-layer", "4"], ["--cache-experts", "96"], ["--cache-experts", "160"]]
    zoo_sizes = [["--cache-per-layer", "4"], ["--cache-experts", "12"], ["--cache-experts", "24"]]
    if quick:
        mixtral_sizes, zoo_sizes = mixtral_sizes[1:3], zoo_sizes[1:]
    for t in shipped[:2]:
        for pol in MIXTRAL_POLICIES:
            for size in mixtral_sizes:
                add(t, pol, size)
        if not quick:
            add(t, "lru", ["--cache-per-layer", "4"], "a100-pcie", ["--timeline-from", "100", "--timeline-steps", "3"])
            add(t, "lru+lookahead(depth=2, budget=3)", ["--cache-experts", "96"], syn["hw-2ce"])
    zoo_fine_sizes = [["--cache-per-layer", "8"], ["--cache-experts", "48"], ["--cache-experts", "80"]]
    for t, sizes in ((shipped[2], zoo_sizes), (shipped[3], zoo_fine_sizes[1:] if quick else zoo_fine_sizes)):
        for pol in ZOO_POLICIES:
            for size in sizes:
                add(t, pol, size)
        add(t, "lru+fiddler", sizes[0], syn["hw-toy"], ["--timeline-from", "40"])
    toy = [("iid2x8k2", [["--cache-experts", "4"], ["--cache-experts", "6"], ["--cache-per-layer", "3"]]),
           ("zipf1x16k1", [["--cache-experts", "2"], ["--cache-experts", "6"]]),
           ("prefill4x8", [["--cache-experts", "8"], ["--cache-experts", "12"], ["--cache-per-layer", "3"]]),
           ("reuse3x8", [["--cache-experts", "5"], ["--cache-experts", "7"]])]
    for name, sizes in toy:
        for pol in TOY_POLICIES:
            for size in sizes[:1] if quick else sizes:
                for hw in ([syn["hw-toy"]] if quick else [syn["hw-toy"], syn["hw-slow"], syn["hw-2ce"]]):
                    add(syn[name], pol, size, hw)
    return out


def _run(argv: list[str], files: dict[str, Path]) -> tuple[int, str]:
    from sim.replay import main

    args = [*argv, "--out", str(files["out"]), "--timeline", str(files["timeline"]), "--chrome-trace", str(files["chrome"])]
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(args)
    return rc, buf_out.getvalue() + "\n--stderr--\n" + buf_err.getvalue()


def _digest(path: Path) -> str | None:
    if not path.exists():
        return None
    data = path.read_bytes()
    if path.suffix == ".html":
        data = _UUID.sub(b"UUID", data)
    return hashlib.sha256(data).hexdigest()


def capture(folder: Path, quick: bool = False, keep: bool = False, only: str | None = None) -> dict[str, dict[str, object]]:
    """Run every case; the manifest maps a case's command to its exit code and output digests."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, object]] = {}
    work = folder / "out"
    work.mkdir(exist_ok=True)
    todo = cases(folder, quick)
    for i, (name, argv) in enumerate(todo):
        if only and only not in name:
            continue
        tag = hashlib.sha256(name.encode()).hexdigest()[:16]  # the same file names in a quick and a full capture
        files = {"out": work / f"{tag}.json", "timeline": work / f"{tag}.html", "chrome": work / f"{tag}.chrome.json"}
        for f in files.values():
            f.unlink(missing_ok=True)
        rc, text = _run(argv, files)
        text = text.replace(str(folder), "$F").replace(str(ROOT) + "/", "")
        entry: dict[str, object] = {"rc": rc, "stdout": hashlib.sha256(text.encode()).hexdigest()}
        for k, f in files.items():
            if k == "out" and f.exists():  # paths inside config: relative to the capture folder
                f.write_text(f.read_text().replace(str(folder), "$F").replace(str(ROOT) + "/", ""))
            entry[k] = _digest(f)
            if not keep:
                f.unlink(missing_ok=True)
        manifest[name] = entry
        print(f"[{i + 1}/{len(todo)}] rc={rc} {name}", file=sys.stderr)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def compare(a: dict[str, dict[str, object]], b: dict[str, dict[str, object]], common: bool = False) -> list[str]:
    """The cases whose outputs differ (with `common`, only among the cases both captured: a quick
    capture against a full one)."""
    diffs = []
    for name in sorted(set(a) & set(b) if common else set(a) | set(b)):
        if a.get(name) != b.get(name):
            ea, eb = a.get(name) or {}, b.get(name) or {}
            which = sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k))
            diffs.append(f"{name}: {', '.join(which)}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("folder", type=Path)
    c.add_argument("--quick", action="store_true", help="fewer sizes and profiles")
    c.add_argument("--keep", action="store_true", help="keep the output files beside the manifest")
    c.add_argument("--only", help="only the cases whose command contains this text")
    d = sub.add_parser("compare")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    d.add_argument("--common", action="store_true", help="only the cases both captured")
    args = ap.parse_args()
    if args.cmd == "capture":
        capture(args.folder, args.quick, args.keep, args.only)
        return 0
    load = lambda p: json.loads((p / "manifest.json" if p.is_dir() else p).read_text())  # noqa: E731
    diffs = compare(load(args.a), load(args.b), args.common)
    print("\n".join(diffs) if diffs else "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
