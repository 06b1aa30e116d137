"""A checkpoint bigger than 2 GB through the loader: peak host RSS against the checkpoint's size,
bytes per miss, and exactness against the unoffloaded eager model (issue 10).

    python bench/big_checkpoint.py [--dir results/big-checkpoint] [--layers 9] [--before-ref REF]

1. builds (once) a bf16 checkpoint of Mixtral-8x7B's config scaled down: a quarter of its width
   (hidden 1024, experts of 1024 x 3584), 9 layers (3.35 GB), 16 experts per layer (twice Mixtral's 8, top-2
   kept: on the CPU device the expert slots are host memory too, and 2 slots per layer are then an
   eighth of the experts rather than a quarter), vocabulary 32000, saved with
   `save_pretrained(max_shard_size="200MB")` in Mixtral's own per-expert format, under the
   git-ignored results/;
2. runs `python -m runtime.run --model DIR --policy lru --cache-per-layer 2 --json` in a child
   process and reads the child's peak RSS from `os.wait4` (the kernel's ru_maxrss of that process);
3. computes the next-token logits of a short prompt twice, each in a process of its own: the whole
   model loaded unoffloaded with transformers' eager experts (its RSS is not the run's), and the
   offloaded model under `lru` with 2 slots per layer; compares them bit for bit;
4. with `--before-ref REF` (a git ref of this repository, e.g. the commit before the loader), runs
   that version's `runtime.run` the same way on a smaller checkpoint (`--before-layers`, since the
   old path needs several times the checkpoint in memory) for the before figure.

Prints a markdown table and writes results/big-checkpoint.json. Timings are not the point (the
machine may be shared: the load average is recorded); memory is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584, "num_local_experts": 16,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096}
PROMPT = "Offloaded experts live in host memory; the slots hold the few the tokens need."


def child(argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> tuple[int, str, str, int, float]:
    """(exit status, stdout, stderr, peak RSS bytes, seconds) of a child process, its RSS from wait4."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), int(usage.ru_maxrss) * 1024, secs


def build(path: Path, layers: int) -> dict[str, float]:
    if (path / "config.json").exists():
        return {}
    code = ("import sys; from runtime.checkpoints import build_checkpoint, scaled_mixtral\n"
            f"build_checkpoint(scaled_mixtral(num_hidden_layers={layers}, **{SHAPE!r}), {str(path)!r}, max_shard_size='200MB')\n")
    rc, _, err, rss, secs = child([sys.executable, "-c", code])
    if rc:
        raise SystemExit(f"building {path} failed:\n{err[-2000:]}")
    return {"build_s": secs, "build_peak_rss_bytes": rss}


LOGITS = """
import sys, torch
from runtime.models import load_model
from runtime.offload import offload
from runtime.record import encode
path, mode, out, prompt = sys.argv[1:5]
model, name = load_model(path, experts="device" if mode == "eager" else "host")
ids = encode(model, name, prompt)
with torch.no_grad():
    if mode == "eager":
        model.set_experts_implementation("eager")
        logits = model(ids).logits
    else:
        with offload(model, "lru", cache_per_layer=2, link="emulated:100GB/s"):
            logits = model(ids).logits
torch.save(logits, out)
"""


def exactness(path: Path, work: Path) -> dict[str, object]:
    import torch

    res: dict[str, object] = {}
    for mode in ("eager", "offloaded"):
        rc, _, err, rss, secs = child([sys.executable, "-c", LOGITS, str(path), mode, str(work / f"{mode}.pt"), PROMPT])
        if rc:
            raise SystemExit(f"{mode} logits failed:\n{err[-2000:]}")
        res[f"{mode}_peak_rss_bytes"], res[f"{mode}_s"] = rss, secs
    a, b = torch.load(work / "eager.pt"), torch.load(work / "offloaded.pt")
    res["logits_equal"] = bool(torch.equal(a, b))
    res["logits_max_abs_diff"] = float((a.float() - b.float()).abs().max())
    res["prompt_tokens"] = int(a.shape[1])
    return res


def run_cli(path: Path, cwd: Path = ROOT) -> dict[str, object]:
    argv = [sys.executable, "-m", "runtime.run", "--model", str(path), "--policy", "lru", "--cache-per-layer", "2",
            "--max-new-tokens", "8", "--json"]
    env = dict(os.environ, PYTHONPATH=str(cwd))
    rc, out, err, rss, secs = child(argv, cwd=cwd, env=env)
    if rc:
        raise SystemExit(f"runtime.run failed (in {cwd}):\n{err[-2000:]}")
    m = json.loads(out)
    return {"peak_rss_bytes": rss, "seconds": secs, "misses": m["misses"], "bytes_h2d": m["bytes_h2d"],
            "bytes_per_miss": m["bytes_h2d"] // max(m["misses"], 1), "dtype": m.get("dtype"), "kl": m["kl_divergence"],
            "token_agreement": m["token_agreement"]}


def before(ref: str, path: Path) -> dict[str, object]:
    """The same runtime.run command with the code of `ref`, from a throwaway clone."""
    with tempfile.TemporaryDirectory(prefix="before-") as tmp:
        subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), tmp], check=True)
        subprocess.run(["git", "-C", tmp, "checkout", "-q", ref], check=True)
        return run_cli(path, cwd=Path(tmp))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "results" / "big-checkpoint", help="where the checkpoints go")
    p.add_argument("--layers", type=int, default=9, help="decoder layers of the big checkpoint (9: 3.35 GB, 6: 2.28 GB)")
    p.add_argument("--before-ref", help="git ref whose runtime.run gives the before figure (skipped if not given)")
    p.add_argument("--before-layers", type=int, default=2, help="decoder layers of the checkpoint the before run uses")
    p.add_argument("--skip-exact", action="store_true", help="skip the exactness check (two more loads)")
    args = p.parse_args(argv)
    from runtime.checkpoints import checkpoint_bytes

    big = args.dir / f"mixtral-16x-{args.layers}l-bf16"
    rows: dict[str, object] = {"date": dt.datetime.now().isoformat(timespec="minutes"), "machine": platform.node(),
                               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "loadavg_start": os.getloadavg(), "checkpoint": str(big.relative_to(ROOT) if big.is_relative_to(ROOT) else big)}
    rows.update(build(big, args.layers))
    size = checkpoint_bytes(big)
    rows["checkpoint_bytes"] = size
    rows["shards"] = len(list(big.glob("*.safetensors")))
    after = run_cli(big)
    rows["after"] = after
    if not args.skip_exact:
        with tempfile.TemporaryDirectory() as work:
            rows["exact"] = exactness(big, Path(work))
    if args.before_ref:
        small = args.dir / f"mixtral-16x-{args.before_layers}l-bf16"
        rows.update({f"before_{k}": v for k, v in build(small, args.before_layers).items()})
        rows["before_checkpoint_bytes"] = checkpoint_bytes(small)
        rows["before_after"] = run_cli(small)
        rows["before"] = before(args.before_ref, small)
        rows["before_ref"] = args.before_ref
    rows["loadavg_end"] = os.getloadavg()
    out = ROOT / "results" / "big-checkpoint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")

    def gb(x: object) -> str:
        return f"{int(x) / 1e9:.2f} GB"  # type: ignore[call-overload]

    print(f"checkpoint {rows['checkpoint']}: {gb(size)} in {rows['shards']} shards (bf16)")
    print("| run | checkpoint | peak host RSS | RSS / checkpoint | bytes per miss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| runtime.run (this version) | {gb(size)} | {gb(after['peak_rss_bytes'])} | "
          f"{int(after['peak_rss_bytes']) / size:.2f}x | {after['bytes_per_miss']} ({after['dtype']}) |")  # type: ignore[call-overload]
    if args.before_ref:
        bsize = int(rows["before_checkpoint_bytes"])  # type: ignore[call-overload]
        for label, r in ((f"runtime.run ({args.before_ref})", rows["before"]), ("runtime.run (this version)", rows["before_after"])):
            print(f"| {label} | {gb(bsize)} | {gb(r['peak_rss_bytes'])} | {int(r['peak_rss_bytes']) / bsize:.2f}x | "  # type: ignore[index]
                  f"{r['bytes_per_miss']} ({r['dtype'] or 'fp32'}) |")  # type: ignore[index]
    if "exact" in rows:
        e: dict = rows["exact"]  # type: ignore[assignment]
        verdict = "bitwise equal" if e["logits_equal"] else f"max |diff| {e['logits_max_abs_diff']:.3g}"
        print(f"logits of a {e['prompt_tokens']}-token prompt, offloaded (lru, 2 slots per layer) vs eager unoffloaded: {verdict}")
    print(f"load average {rows['loadavg_start']} -> {rows['loadavg_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
