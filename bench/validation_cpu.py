"""The simulator's predictions against measured runs on this CPU with the emulated link.

    python bench/validation_cpu.py [--model tiny-mixtral] [--tokens 32]

For each setting: calibrate this machine for the model and link (`runtime.calibrate`), then run the
policy, record it and replay the recording with the calibrated profile (`runtime.validate`), and
print measured against predicted. Two settings: transfer-bound (a slow link, 3 experts per layer)
and compute-bound (a fast link, 6 experts per layer).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lab.hardware import HardwareProfile  # noqa: E402
from runtime.calibrate import calibrate  # noqa: E402
from runtime.record import read_prompts  # noqa: E402
from runtime.validate import table, validate  # noqa: E402

SETTINGS = [
    ("transfer-bound", "emulated:0.1GB/s,20us", 3),
    ("compute-bound", "emulated:50GB/s,20us", 6),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--policy", default="lru")
    args = ap.parse_args()
    prompts = read_prompts(ROOT / "examples" / "prompts.txt")
    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"prompts examples/prompts.txt, {args.tokens} new tokens each\n")
    for label, link, per_layer in SETTINGS:
        prof = HardwareProfile.model_validate(calibrate(args.model, link))
        with tempfile.TemporaryDirectory() as tmp:
            res = validate(args.model, args.policy, cache_per_layer=per_layer, link=link, profile=prof, prompts=prompts,
                           max_new_tokens=args.tokens, out_dir=tmp)
        print(f"### {label}\n")
        print(table(res))
        print()


if __name__ == "__main__":
    main()
