"""The `runtime` case of `python -m policies.check`: a real (tiny) Mixtral offloaded under the policy
counts what the simulator predicts for the recording of that very run (`runtime.validate`). Needs the
runtime extra (torch, transformers); without it the case is skipped."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from policies import Policy
from policies.check import CaseFailed, Skip

MODEL = "tiny-mixtral"
PROMPTS = ["Mixture-of-experts models route every token to a few experts.", "A policy decides what stays resident."]


def check(fresh: Callable[[], Policy]) -> str:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise Skip("the runtime extra (torch, transformers) is not installed") from None
    from runtime.validate import validate

    with tempfile.TemporaryDirectory(prefix="policies-check-") as out:
        # a datasheet profile: the counts do not depend on it (calibration would only cost time)
        res = validate(MODEL, fresh(), cache_per_layer=3, link="emulated:1000GB/s", profile="rtx4090", prompts=PROMPTS,
                       max_new_tokens=4, out_dir=out)
    if not res["counts_equal"]:
        diff = [f"{r['metric']} {r['measured']} measured, {r['predicted']} predicted" for r in res["rows"] if r["equal"] is False]
        raise CaseFailed(f"the runtime on {MODEL} counts differently from the simulator: " + ", ".join(diff))
    rows = {r["metric"]: r for r in res["rows"]}
    return f"{MODEL}: {rows['misses']['measured']} misses, equal in both engines"
