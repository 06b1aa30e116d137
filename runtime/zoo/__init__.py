"""The model zoo: small MoE language models of real transformers architectures, trained on this CPU
from the Python standard library's sources (`python -m runtime.zoo.train --preset coarse|fine`), whose
checkpoints ship in `runtime/zoo/checkpoints/` and load as `--model zoo:coarse` / `zoo:fine`.

This module imports neither torch nor transformers: `runtime.models` asks it where a zoo model lives.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PREFIX = "zoo:"
NAMES = ("coarse", "fine")
LOG_FILE = "train_log.json"


def is_zoo_name(name: str) -> bool:
    return name.startswith(PREFIX)


def checkpoint_dir(name: str) -> Path:
    """`zoo:coarse` -> its shipped checkpoint directory. Raises ValueError for an unknown preset,
    FileNotFoundError for a preset whose checkpoint is missing."""
    preset = name[len(PREFIX):] if is_zoo_name(name) else name
    if preset not in NAMES:
        raise ValueError(f"unknown zoo model {name!r}: one of {', '.join(PREFIX + n for n in NAMES)}")
    path = CHECKPOINTS / preset
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name}: no checkpoint in {path} (train it with python -m runtime.zoo.train --preset {preset})"
        )
    return path
