"""Bad input to the runtime's CLIs (`runtime.run`, `record`, `calibrate`, `validate`) gives one clear
line on stderr and a non-zero exit, never a traceback (issue 13, item 7; issue 10's bad input), and
their help says what every option does and its default. The CLIs are called in-process (`main`)
except where the test is about the process itself (no torch installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from runtime import calibrate as calibrate_mod  # noqa: E402
from runtime import record as record_mod  # noqa: E402
from runtime import run as run_mod  # noqa: E402
from runtime import validate as validate_mod  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAINS = {"runtime.run": run_mod.main, "runtime.record": record_mod.main, "runtime.calibrate": calibrate_mod.main,
         "runtime.validate": validate_mod.main}
BASE = {
    "runtime.run": ["--model", "tiny-mixtral", "--cache-per-layer", "2", "--max-new-tokens", "2"],
    "runtime.record": ["--model", "tiny-mixtral", "--max-new-tokens", "2"],
    "runtime.calibrate": ["--model", "tiny-mixtral"],
    "runtime.validate": ["--model", "tiny-mixtral", "--cache-per-layer", "2", "--max-new-tokens", "2"],
}


def one_line(capsys: pytest.CaptureFixture[str], prog: str, argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) if argv and argv[-1] == "--exit" else _nothing():
        rc = MAINS[prog]([a for a in argv if a != "--exit"])
        assert rc not in (0, None), rc
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") or err.startswith(f"python -m {prog}: error: "), err
    for f in fragments:
        assert f in err, (f, err)
    return err


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> bool:
        return False


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("hello experts\n")
    return p


def _argv(prog: str, tmp_path: Path, prompts: Path, *extra: str) -> list[str]:
    argv = list(BASE[prog])
    if prog == "runtime.record":
        argv += ["--prompts", str(prompts), "-o", str(tmp_path / "t.jsonl")]
    if prog == "runtime.calibrate":
        argv += ["-o", str(tmp_path / "profile.json")]
    if prog == "runtime.validate":
        argv += ["--out-dir", str(tmp_path / "v")]
    return argv + list(extra)


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_bad_device_dtype_and_pin(prog: str, tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--device", "bogus"), "bogus")
    if not torch.cuda.is_available():
        one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--device", "cuda"), "--device cuda")
    one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--dtype", "int3"), "unknown dtype 'int3'", "bf16")
    one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--pin-gb", "1e9"), "--pin-gb", "host's memory")
    one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--pin-gb", "-1"), "--pin-gb must be >= 0")


@pytest.mark.parametrize("prog", ["runtime.run", "runtime.record", "runtime.validate"])
def test_bad_prompt_files(prog: str, tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02hello\xff")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    base = [a for a in _argv(prog, tmp_path, prompts) if a != str(prompts)]
    if prog == "runtime.record":
        base = base[: base.index("--prompts")] + base[base.index("--prompts") + 1:]
    one_line(capsys, prog, [*base, "--prompts", str(binary)], "bin.txt", "binary")
    one_line(capsys, prog, [*base, "--prompts", str(latin)], "latin.txt:2", "not UTF-8")
    one_line(capsys, prog, [*base, "--prompts", str(tmp_path)], "not a file")


def test_bad_text_files(tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _argv("runtime.run", tmp_path, prompts)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)))
    one_line(capsys, "runtime.run", [*base, "--text", str(empty)], "empty.txt", "empty text file")
    one_line(capsys, "runtime.run", [*base, "--text", str(binary)], "b.bin", "binary")
    one_line(capsys, "runtime.run", [*base, "--text", str(tmp_path / "nope.txt")], "nope.txt", "no such text file")


@pytest.mark.parametrize("prog", ["runtime.run", "runtime.record", "runtime.validate"])
def test_max_new_tokens_zero(prog: str, tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(prog, tmp_path, prompts, "--max-new-tokens", "0", "--exit")
    one_line(capsys, prog, argv, "--max-new-tokens", "expected an integer >= 1, got 0")
    one_line(capsys, prog, _argv(prog, tmp_path, prompts, "--batch-size", "0", "--exit"), "--batch-size")


def test_output_under_a_file(tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "t.jsonl")
    argv = ["--model", "tiny-mixtral", "--prompts", str(prompts), "-o", bad]
    one_line(capsys, "runtime.record", argv, "afile is a file, not a folder")
    one_line(capsys, "runtime.calibrate", ["--model", "tiny-mixtral", "-o", bad], "afile is a file")
    one_line(capsys, "runtime.validate", [*BASE["runtime.validate"], "--out-dir", str(tmp_path / "afile" / "v")],
             "afile is a file")


def test_record_of_a_model_without_moe_layers(tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    dense = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    capsys.readouterr()  # save_pretrained's own progress bar
    one_line(capsys, "runtime.record", ["--model", str(tmp_path / "dense"), "--prompts", str(prompts), "-o",
                                        str(tmp_path / "t.jsonl")], "no MoE layer", "nothing to record")
    one_line(capsys, "runtime.run", ["--model", str(tmp_path / "dense"), "--cache-per-layer", "2"], "no MoE layer")


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_help_explains_every_option_with_defaults(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = {"runtime.run": run_mod, "runtime.record": record_mod, "runtime.calibrate": calibrate_mod,
              "runtime.validate": validate_mod}[prog]
    parser = module.build_parser()
    for action in parser._actions:
        assert action.help, (prog, action.option_strings)
    with pytest.raises(SystemExit) as exc:
        MAINS[prog](["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for opt in ("--model", "--link", "--device", "--dtype", "--pin-gb"):
        assert opt in out, (prog, opt)
    assert "(default: emulated:16GB/s)" in out and "(default: auto)" in out and "(default: cpu)" in out


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_help_without_torch_says_how_to_install(prog: str) -> None:
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['x', '--help'];"
            f"runpy.run_module({prog!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{prog}: error: needs the runtime extra" in r.stderr and "pip install 'moe-offload-lab[runtime]'" in r.stderr


class _Bar:
    made: list[_Bar] = []

    def __init__(self, *a: object, total: int = 0, **k: object) -> None:
        self.total, self.n, self.updates = total, 0, 0
        _Bar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates += 1

    def close(self) -> None:
        pass


def test_progress_bars_move_per_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    _Bar.made.clear()
    m = record_mod.record("tiny-mixtral", ["one prompt", "two", "three"], tmp_path / "t.jsonl", max_new_tokens=4,
                          batch_size=2, link="emulated:100GB/s", progress=True)
    bar = _Bar.made[-1]
    assert bar.total == bar.n == 3 * 4 and bar.updates == m["steps"] == 2 * 4  # 2 batches x 4 steps
    _Bar.made.clear()
    calibrate_mod.calibrate("tiny-mixtral", "emulated:100GB/s", repeats=1, progress=True)
    bar = _Bar.made[-1]
    assert bar.total == bar.n > 3


def test_validate_prints_the_cache_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = {"model": "m", "policy": "lru", "cache": {"experts": None, "per_layer": 3}, "link": "l", "profile": "p", "rows": []}
    first = validate_mod.table(res).splitlines()[0]
    assert "3 slots per layer" in first and "{" not in first
