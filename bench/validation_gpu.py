"""The simulator's predictions against measured runs on a CUDA GPU, copies over the real PCIe link.

    python bench/validation_gpu.py [--models tiny-mixtral,small-mixtral] [--tokens 32] [--policies "lru;lru+fiddler"]

For each model: calibrate the card and its link for the model (`runtime.calibrate --device cuda
--link cuda`), then for each setting and policy run the policy, record it and replay the recording
with the calibrated profile (`runtime.validate`), and print measured against predicted. Settings:
transfer-bound (top-k + 1 slots per layer: most steps miss) and resident (every expert has a slot:
after the first loads, compute-bound). `small-mixtral` has Mixtral's expert shape at 1/4 width
(42 MiB float32 experts), so its misses cost what a real expert's do on this link.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lab.hardware import HardwareProfile  # noqa: E402
from runtime.calibrate import calibrate  # noqa: E402
from runtime.models import load_model  # noqa: E402
from runtime.record import read_prompts  # noqa: E402
from runtime.validate import table, validate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-mixtral,small-mixtral")
    ap.add_argument("--policies", default="lru", help="policy specs separated by semicolons")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate again right before every run, with its policy (its per-call host work is "
                         "measured; the host's speed drifts over a long process)")
    ap.add_argument("--repeats", type=int, default=3, help="calibration repeats")
    ap.add_argument("--out", type=Path, help="also write the profiles and results (JSON) into this folder")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/validation_gpu.py: no CUDA device")
    prompts = read_prompts(ROOT / "examples" / "prompts.txt")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"prompts examples/prompts.txt, {args.tokens} new tokens each\n")
    results: list[dict] = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        m, _ = load_model(model)
        n_exp, top_k = m.config.num_local_experts, m.config.num_experts_per_tok
        del m
        prof_dict = calibrate(model, "cuda", device="cuda", repeats=args.repeats)
        prof = HardwareProfile.model_validate(prof_dict)
        print(f"## {model} (calibrated in {time.perf_counter() - t0:.0f} s: link "
              f"{prof.link.h2d_gbps:.1f} GB/s, {prof.link.latency_us:.1f} us per copy)\n")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile-{model}.json").write_text(json.dumps(prof_dict, indent=1))
        for label, per_layer in (("transfer-bound", top_k + 1), ("resident", n_exp)):
            for pol in args.policies.split(";"):
                if args.recalibrate:
                    prof = HardwareProfile.model_validate(
                        calibrate(model, "cuda", device="cuda", repeats=args.repeats, policy=pol))
                with tempfile.TemporaryDirectory() as tmp:
                    res = validate(model, pol, cache_per_layer=per_layer, link="cuda", profile=prof, prompts=prompts,
                                   max_new_tokens=args.tokens, out_dir=tmp, device="cuda")
                print(f"### {label}, {pol}\n")
                print(table(res))
                print(flush=True)
                results.append({"setting": label, "link_latency_us": prof.link.latency_us, **res})
                if args.out:
                    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
