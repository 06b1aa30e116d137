"""docs/writing-a-policy.md runs: its policy is the shipped file, its rules are `RULES`, and its
commands (replay, the conformance suite, the sweep, a package of one's own, the validation on a tiny
model) give what the page shows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies.plan import RULES
from sim.sweep import load_sweep, read_results, run_sweep

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-a-policy.md"


def between(name: str) -> str:
    m = re.search(rf"<!-- {re.escape(name)}:begin -->\n(.*?)<!-- {re.escape(name)}:end -->", DOC.read_text(encoding="utf-8"), re.S)
    assert m, f"{DOC.name}: no {name} markers"
    return m.group(1)


def blocks(name: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", between(name), re.S)


def console(name: str) -> tuple[list[str], list[str]]:
    """The command (`$ ...`) of a console block and the lines it shows (`...` skips lines)."""
    (block,) = blocks(name, "console")
    lines = block.splitlines()
    assert lines[0].startswith("$ python -m ")
    return lines[0][len("$ python -m "):].split(), lines[1:]


def _shell_split(args: list[str]) -> list[str]:
    return [a.strip("'") for a in args]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def test_the_example_is_the_shipped_policy() -> None:
    (code,) = blocks("s3fifo", "python")
    assert code == (ROOT / "policies" / "s3fifo.py").read_text(encoding="utf-8")


def test_the_rules_are_the_ones_apply_plan_checks() -> None:
    rows = re.findall(r"^\| `([\w-]+)` \| (.*) \|$", between("plan-rules"), re.M)
    assert dict(rows) == RULES


def test_replay_and_check_show_what_the_page_shows() -> None:
    for name in ("s3fifo-replay", "s3fifo-check"):
        args, shown = console(name)
        r = run(_shell_split(args))
        assert r.returncode == 0, r.stderr
        out = iter(r.stdout.splitlines())
        for want in shown:
            if want == "...":
                continue
            assert any(line == want for line in out), (name, want, r.stdout)


def test_the_sweep_runs(tmp_path: Path) -> None:
    (toml,) = blocks("s3fifo-sweep", "toml")
    assert toml == (ROOT / "sweeps" / "s3fifo.toml").read_text(encoding="utf-8")
    sweep = load_sweep(ROOT / "sweeps" / "s3fifo.toml")
    s4 = [p for p in sweep.points if p.columns["cache_size"] == 4]  # the page's replay, as a point
    summary = run_sweep(sweep.__class__(sweep.path, sweep.description, sweep.traces, s4), tmp_path / "out", jobs=2)
    assert not summary.errors
    rows = {r["policy"]: r for r in read_results(tmp_path / "out")}
    assert rows["s3fifo(small=0.1, max_freq=3)"]["hits"] == 9511
    assert rows["belady"]["hit_rate"] >= max(r["hit_rate"] for r in rows.values())


@pytest.mark.slow
def test_a_package_of_ones_own(tmp_path: Path) -> None:
    """The page's package, built and installed by pip (into a folder of its own), used by name."""
    pyproject, = blocks("own-package", "toml")
    module, = blocks("own-package", "python")
    pkg = tmp_path / "my-policies"
    (pkg / "my_policies").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(pyproject.replace('dependencies = ["moe-offload-lab"]\n', ""))  # installed here already
    (pkg / "my_policies" / "__init__.py").write_text("")
    (pkg / "my_policies" / "mru.py").write_text(module)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(pkg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    r = run(["sim.replay", "traces/mixtral-8x7b-gsm8k.jsonl.gz", "--policy", "mru", "--cache-per-layer", "4", "--no-progress"], env)
    assert r.returncode == 0 and "policy            mru\n" in r.stdout, r.stderr
    r = run(["policies.check", "mru", "--no-engines"], env)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_the_validation_on_a_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
    pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")
    cmd = re.search(r"\$ python -m (runtime\.validate .*?)\n```", DOC.read_text(encoding="utf-8"), re.S)
    assert cmd
    args = cmd.group(1).replace("\\\n", " ").split()
    args[args.index("--out-dir") + 1] = str(tmp_path / "v")
    args[args.index("--max-new-tokens") + 1] = "4"  # the page's 8 tokens, shortened
    r = run(args)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert res["counts_equal"] and res["policy"] == "s3fifo(small=0.1, max_freq=3)"
