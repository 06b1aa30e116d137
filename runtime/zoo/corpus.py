"""The zoo's corpus: the Python standard library's own source files, which every machine that runs
this project has on disk (no download), split by file into training and held-out parts.

The files are the stdlib's `*.py` (found with `sysconfig`), without its tests, `site-packages` and a
few folders of generated tables or bundled applications (`EXCLUDED`), in sorted order. A file is
held out when the first byte of the SHA-256 of its relative path is below 26 (about 10 %): the split
of a file does not depend on which other files a Python version has. The corpus is the PSF-licensed
standard library of the running interpreter; its digest goes into each training log.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXCLUDED = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "idlelib", "turtledemo",
    "encodings", "pydoc_data", "lib2to3", "distutils", "ensurepip", "__phello__",
})
HELD_OUT_BELOW = 26  # of 256: the first byte of sha256(relative path) < 26 holds a file out

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL = [PAD, BOS, EOS]  # ids 0, 1, 2 (as the tiny models' configs)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    return hashlib.sha256(rel.encode("utf-8")).digest()[0] < HELD_OUT_BELOW


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: list[str]  # relative paths, sorted
    held_out: list[str]

    def text(self, rel: str) -> str:
        return (self.root / rel).read_text(encoding="utf-8", errors="replace")

    def texts(self, files: Sequence[str]) -> Iterator[str]:
        for rel in files:
            yield self.text(rel)

    def describe(self) -> dict[str, Any]:
        h = hashlib.sha256()
        chars = {"train": 0, "held_out": 0}
        for part, files in (("train", self.train), ("held_out", self.held_out)):
            for rel in files:
                data = (self.root / rel).read_bytes()
                h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
                chars[part] += len(data)
        return {
            "source": "Python standard library source (*.py), PSF license",
            "python": sys.version.split()[0],
            "root": str(self.root),
            "excluded_folders": sorted(EXCLUDED),
            "files": {"train": len(self.train), "held_out": len(self.held_out)},
            "bytes": chars,
            "sha256": h.hexdigest(),
        }


def stdlib_corpus(root: Path | None = None) -> Corpus:
    root = root or stdlib_root()
    files = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if set(parts) & EXCLUDED or parts[0].startswith("config-") or not f.is_file():
            continue
        files.append(f.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"{root}: no standard-library sources found")
    held = [r for r in files if is_held_out(r)]
    train = [r for r in files if not is_held_out(r)]
    return Corpus(root, train, held)


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE (`tokenizers`), trained offline; `<bos>` is prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def fast_tokenizer(tok: Any) -> Any:
    """The `tokenizers` object as a transformers tokenizer (what `save_pretrained` writes and
    `AutoTokenizer` reads back)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def token_stream(tok: Any, texts: Iterator[str]) -> list[int]:
    """Every file as `<bos> tokens <eos>`, concatenated."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for text in texts:
        out.extend(tok.encode(text).ids)  # the post-processor puts <bos> first
        out.append(eos)
    return out


def blocks(ids: Sequence[int], length: int) -> Any:
    """Non-overlapping blocks of `length` tokens (a torch int64 tensor, the tail dropped)."""
    import torch

    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.int64).view(n, length)


def held_out_blocks(tokenizer_dir: Path | str, length: int = 256, max_blocks: int | None = None) -> Any:
    """The held-out split tokenized with a checkpoint's tokenizer, in blocks (what the training log's
    held-out perplexity is measured on; `max_blocks` keeps the first ones)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    corpus = stdlib_corpus()
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * length
    for text in corpus.texts(corpus.held_out):
        ids.extend(tok(text).input_ids)
        ids.append(tok.eos_token_id)
        if need is not None and len(ids) >= need:
            break
    b = blocks(ids, length)
    return b if max_blocks is None else b[:max_blocks]
