"""What the runtime's CLIs share: one parser style (one-line errors, defaults shown in `--help`), the
model options every one of them takes, and reading the user's files into one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

from traces.cli import OneLineParser


class InputError(ValueError):
    """A user's file or option the runtime cannot use; the message is one line."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default after its help, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "%(default)" not in text and action.option_strings and not (d is None or d is False or d is argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def runtime_parser(prog: str, doc: str | None) -> OneLineParser:
    return OneLineParser(prog=f"python -m {prog}", description=doc, formatter_class=_Help)


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def add_model_options(p: argparse.ArgumentParser, *, policy_default: str | None = "lru", batch: bool = False,
                      cache: bool = True) -> None:
    """--model, --policy, the cache size, --link, --device, --dtype, --pin-gb (and --batch-size)."""
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory, a zoo model (zoo:coarse, "
                   "zoo:fine) or a built test model (tiny-mixtral, tiny-olmoe, tiny-qwen2-moe, tiny-deepseek-v3, "
                   "tiny-qwen3-moe, small-mixtral)")
    p.add_argument("--policy", default=policy_default, help="policy spec, e.g. lru, lfu(decay=0.8), hobbit(bits=4); "
                   "see docs/policies.md" if policy_default else "policy spec (default: keep every expert)")
    if cache:
        p.add_argument("--cache-experts", type=positive, metavar="N", help="expert slots on the device, shared by all layers")
        p.add_argument("--cache-per-layer", type=positive, metavar="K", help="expert slots per MoE layer")
        p.add_argument("--cache-gb", type=float, metavar="X", help="the expert slots that fit in X GiB, as sim.replay counts them")
    p.add_argument("--link", default="emulated:16GB/s", help="how experts reach the device: cuda (real copies on "
                   "CUDA streams) or emulated:<bandwidth>[,<latency>] (a copy thread held to that rate)")
    p.add_argument("--device", default="cpu", help="where the dense part and the expert slots live: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="weights' dtype: auto (the checkpoint's own, from its config), "
                   "bf16, fp16 or fp32")
    p.add_argument("--pin-gb", type=float, default=None, metavar="G", help="page-lock at most G GiB of the host "
                   "tier (CUDA; the rest stays pageable, copied more slowly); default: pin all of it")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (or a .py file) that registers policies first; repeatable")
    if batch:
        p.add_argument("--batch-size", type=positive, default=1, metavar="B",
                       help="prompts run together, left-padded as generate does")


def cache_sizes(args: argparse.Namespace) -> int:
    """How many of --cache-experts, --cache-per-layer and --cache-gb are given."""
    return sum(getattr(args, k, None) is not None for k in ("cache_experts", "cache_per_layer", "cache_gb"))


def read_text(path: str | Path, what: str = "text") -> str:
    """A UTF-8 text file, or one line saying why not (missing, a directory, binary, not UTF-8, empty)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such {what} file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror}") from None
    if b"\x00" in data:
        raise InputError(f"{p}: a binary file (NUL bytes), expected UTF-8 {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{p}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise InputError(f"{p}: empty {what} file")
    return text


def check_out(path: str | Path) -> Path:
    """An output path whose folder exists or can be made (a file where a folder should be is refused)."""
    p = Path(path)
    for parent in [p.parent, *p.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{p}: cannot write there: {parent} is a file, not a folder")
            break
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected a file name")
    return p
