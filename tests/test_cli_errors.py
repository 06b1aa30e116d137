"""Bad input to `python -m sim.replay` gives one clear line on stderr and exit status 2, never a traceback.

Every case starts from a small valid trace written with `traces.synthetic`, then breaks one thing: a
line of the trace (edited as text), a file next to it, or a command-line argument. The message must
name what is wrong: the file and line, the field, the bad name, the known alternatives.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.hardware import PROFILE_DIR, presets
from policies import available
from traces.synthetic import iid_calls, toy_model, write_trace

ROOT = Path(__file__).resolve().parent.parent

# Two MoE layers, 8 experts, top-2, 6 decode steps. Lines of t.jsonl:
#   1 header | 2 layer s0 l0 | 3 layer s0 l1 | 4 step 0 | 5 layer s1 l0 | 6 layer s1 l1 | 7 step 1 | ...
#   ... | 19 step 5 | 20 footer
MODEL = toy_model(num_layers=2, num_experts=8, top_k=2)
N_CALLS = 12
N_LINES = 1 + N_CALLS + N_CALLS // 2 + 1
OK_CACHE = ["--cache-experts", "4"]


def run_replay(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sim.replay", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def make_trace(path: Path, n_calls: int = N_CALLS, model=MODEL) -> Path:  # type: ignore[no-untyped-def]
    write_trace(path, model, iid_calls([1.0] * model.num_experts, n_calls, num_layers=model.num_moe_layers,
                                       top_k=model.top_k, seed=1))
    return path


def edit_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in edit(lines)))
    return path


def edit_record(path: Path, lineno: int, change: Callable[[dict], object]) -> Path:
    """Rewrite line `lineno` (1-based): `change` edits the parsed object in place or returns a str."""

    def edit(lines: list[str]) -> list[str]:
        obj = json.loads(lines[lineno - 1])
        out = change(obj)
        lines[lineno - 1] = out if isinstance(out, str) else json.dumps(obj)
        return lines

    return edit_lines(path, edit)


def profile_json(name: str = "rtx4090") -> dict:
    return json.loads((PROFILE_DIR / f"{name}.json").read_text())


@dataclass(frozen=True)
class Case:
    id: str
    # (tmp_path, a valid trace t.jsonl in tmp_path) -> (arguments after `python -m sim.replay`, fragments)
    make: Callable[[Path, Path], tuple[list[str | Path], list[str]]]


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda obj: obj.__setitem__(key, value)


# -- broken traces ---------------------------------------------------------------------------------
def bad_json(tmp: Path, t: Path):
    edit_lines(t, lambda ls: ls[:2] + [ls[2][:-7]] + ls[3:])  # line 3 loses its closing brackets
    return [t, *OK_CACHE], ["t.jsonl:3", "JSON"]


def wrong_version(tmp: Path, t: Path):
    edit_record(t, 1, _set("version", 2))
    return [t, *OK_CACHE], ["t.jsonl:1", "version", "2"]


def header_missing(tmp: Path, t: Path):
    edit_lines(t, lambda ls: ls[1:])
    return [t, *OK_CACHE], ["t.jsonl:1", "header"]


def empty_file(tmp: Path, t: Path):
    t.write_text("")
    return [t, *OK_CACHE], ["t.jsonl", "empty"]


def nonexistent(tmp: Path, t: Path):
    return [tmp / "missing.jsonl", *OK_CACHE], ["missing.jsonl", "no such file"]


def directory(tmp: Path, t: Path):
    d = tmp / "tracedir"
    d.mkdir()
    return [d, *OK_CACHE], ["tracedir", "directory"]


def expert_out_of_range(tmp: Path, t: Path):
    edit_record(t, 3, lambda o: o["topk"][0].__setitem__(0, 99))
    return [t, *OK_CACHE], ["t.jsonl:3", "topk", "99", "num_experts=8"]


def topk_row_length(tmp: Path, t: Path):
    def three(o: dict) -> None:  # consistent topk and weights rows, but 3 columns where top_k is 2
        o["topk"] = [[0, 1, 2]]
        o["weights"] = [[0.5, 0.3, 0.2]]

    edit_record(t, 3, three)
    return [t, *OK_CACHE], ["t.jsonl:3", "topk", "top_k is 2"]


def nan_weight(tmp: Path, t: Path):
    edit_record(t, 3, lambda o: o["weights"][0].__setitem__(0, math.nan))
    assert "NaN" in t.read_text().splitlines()[2]  # the literal token, as a careless writer emits it
    return [t, *OK_CACHE], ["t.jsonl:3", "weights", "finite number"]


def weights_rows(tmp: Path, t: Path):
    edit_record(t, 3, lambda o: o["weights"].append([0.5, 0.5]))
    return [t, *OK_CACHE], ["t.jsonl:3", "weights", "tokens=1"]


def layer_out_of_range(tmp: Path, t: Path):
    edit_record(t, 3, _set("layer", 5))
    return [t, *OK_CACHE], ["t.jsonl:3", "layer", "5"]


def unknown_kind(tmp: Path, t: Path):
    edit_record(t, 3, _set("kind", "bogus"))
    return [t, *OK_CACHE], ["t.jsonl:3", "kind", "bogus"]


def step_backwards(tmp: Path, t: Path):
    edit_record(t, 6, _set("step", 0))  # a step-1 record that claims step 0
    return [t, *OK_CACHE], ["t.jsonl:6", "step"]


def truncated(tmp: Path, t: Path):
    edit_lines(t, lambda ls: ls[:-1])
    return [t, *OK_CACHE], ["t.jsonl", "truncated", "footer", "--allow-truncated"]


def footer_mismatch(tmp: Path, t: Path):
    edit_record(t, N_LINES, _set("layer_records", 99))
    return [t, *OK_CACHE], [f"t.jsonl:{N_LINES}", "layer_records", "99"]


def gzip_cut(tmp: Path, t: Path):
    gz = make_trace(tmp / "big.jsonl.gz", n_calls=2000)
    data = gz.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    gz.write_bytes(data[: len(data) // 2])
    return [gz, *OK_CACHE], ["big.jsonl.gz:"]


def extra_field(tmp: Path, t: Path):
    edit_record(t, 3, _set("bogus_field", 1))
    return [t, *OK_CACHE], ["t.jsonl:3", "bogus_field"]


def second_header(tmp: Path, t: Path):
    edit_lines(t, lambda ls: ls[:4] + [ls[0]] + ls[4:])
    return [t, *OK_CACHE], ["t.jsonl:5", "header"]


def after_footer(tmp: Path, t: Path):
    edit_lines(t, lambda ls: ls + [ls[-2]])
    return [t, *OK_CACHE], [f"t.jsonl:{N_LINES + 1}", "footer"]


def not_utf8(tmp: Path, t: Path):
    data = t.read_bytes().split(b"\n")
    data[2] = data[2].replace(b'"decode"', b'"dec\xffode"')
    t.write_bytes(b"\n".join(data))
    return [t, *OK_CACHE], ["t.jsonl:3", "UTF-8"]


def repeated_expert(tmp: Path, t: Path):
    edit_record(t, 3, lambda o: o.__setitem__("topk", [[4, 4]]))
    return [t, *OK_CACHE], ["t.jsonl:3", "topk", "repeats"]


def lookahead_backwards(tmp: Path, t: Path):
    edit_record(t, 3, _set("lookahead", {"0": [[1, 2]]}))  # layer 1 predicting layer 0
    return [t, *OK_CACHE], ["t.jsonl:3", "lookahead.0"]


def lookahead_odd_digit(tmp: Path, t: Path):
    # '²' passes str.isdigit() but not int(): the key is not a layer index
    edit_record(t, 2, _set("lookahead", {"\u00b2": [[1, 2]]}))
    return [t, *OK_CACHE], ["t.jsonl:2", "lookahead"]


def newline_in_field_name(tmp: Path, t: Path):
    # a field name is data from the file: it must not break the one-line message
    edit_record(t, 3, _set("bad\nname", 1))
    return [t, *OK_CACHE], ["t.jsonl:3"]


# -- bad cache sizes -------------------------------------------------------------------------------
def cache_below_topk(tmp: Path, t: Path):
    return [t, "--cache-experts", "1"], ["cache too small", "top_k=2"]


def cache_per_layer_below_topk(tmp: Path, t: Path):
    return [t, "--cache-per-layer", "1"], ["cache too small", "per layer", "top_k=2"]


def no_cache_size(tmp: Path, t: Path):
    return [t], ["exactly one cache size", "--cache-experts"]


def two_cache_sizes(tmp: Path, t: Path):
    return [t, "--cache-experts", "4", "--cache-gb", "1"], ["exactly one cache size"]


def per_layer_with_global(tmp: Path, t: Path):
    return [t, "--cache-per-layer", "2", "--partition", "global"], ["--cache-per-layer", "--partition"]


def cache_gb_too_small(tmp: Path, t: Path):
    return [t, "--cache-gb", "0.0001"], ["0.0001 GiB", "toy"]


def cache_zero(tmp: Path, t: Path):
    return [t, "--cache-experts", "0"], ["--cache-experts"]


def cache_gb_inf(tmp: Path, t: Path):
    return [t, "--cache-gb", "inf"], ["--cache-gb"]


def cache_not_a_number(tmp: Path, t: Path):
    return [t, "--cache-experts", "four"], ["--cache-experts", "four"]


# -- bad hardware ----------------------------------------------------------------------------------
def unknown_hardware(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--hardware", "nope-gpu"], ["'nope-gpu'", *presets()]


def hardware_missing_field(tmp: Path, t: Path):
    prof = profile_json()
    del prof["link"]["h2d_gbps"]
    f = tmp / "hw.json"
    f.write_text(json.dumps(prof, indent=2))
    return [t, *OK_CACHE, "--hardware", f], ["hw.json", "link.h2d_gbps"]


def hardware_not_json(tmp: Path, t: Path):
    f = tmp / "hw.json"
    f.write_text("name: rtx4090\nlink: fast\n")
    return [t, *OK_CACHE, "--hardware", f], ["hw.json:1", "JSON"]


def hardware_not_utf8(tmp: Path, t: Path):
    f = tmp / "hw.json"
    f.write_bytes(b"\xff\xfe{}")
    return [t, *OK_CACHE, "--hardware", f], ["hw.json"]


def hardware_directory(tmp: Path, t: Path):
    d = tmp / "hwdir"
    d.mkdir()
    return [t, *OK_CACHE, "--hardware", d], ["hwdir"]


def profile_other_model(tmp: Path, t: Path):
    prof = profile_json()
    prof["source"] = "calibrated"
    cost = {"fixed_s": 1e-5, "per_token_s": 1e-6, "floor_s": 1e-4}
    prof["fit"] = {"model": "other-model", "dense": cost, "gpu_expert": cost, "cpu_expert": cost}
    f = tmp / "calibrated.json"
    f.write_text(json.dumps(prof))
    return [t, *OK_CACHE, "--hardware", f], ["other-model", "'toy'", "calibrat"]


# -- bad policies ----------------------------------------------------------------------------------
def unknown_policy(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", "nosuchpolicy"], ["'nosuchpolicy'", *available()]


def unknown_param(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", "lfu(foo=1)"], ["lfu", "'foo'", "decay"]


def bad_param_value(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", "lfu(decay=2)"], ["lfu", "decay"]


def malformed_spec(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", "lru("], ["'lru('"]


def unhashable_param(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", "lfu(decay={[]: 1})"], ["lfu", "decay"]


def static_other_shape(tmp: Path, t: Path):
    other = make_trace(tmp / "other.jsonl", n_calls=6, model=toy_model(num_layers=3, num_experts=4, top_k=2, name="shape3x4"))
    return [t, *OK_CACHE, "--policy", f"static(trace={other})"], ["static", "other.jsonl", "shape3x4", "toy"]


def static_missing_trace(tmp: Path, t: Path):
    return [t, *OK_CACHE, "--policy", f"static(trace={tmp / 'nope.jsonl'})"], ["nope.jsonl", "no such file"]


# -- bad outputs -----------------------------------------------------------------------------------
def out_parent_is_file(tmp: Path, t: Path):
    blocker = tmp / "blocker"
    blocker.write_text("a regular file\n")
    return [t, *OK_CACHE, "--out", blocker / "result.json"], ["blocker", "cannot write"]


def timeline_parent_is_file(tmp: Path, t: Path):
    blocker = tmp / "blocker"
    blocker.write_text("a regular file\n")
    return [t, *OK_CACHE, "--timeline", blocker / "tl.html"], ["blocker", "cannot write"]


CASES = [
    Case(f.__name__, f)
    for f in [
        bad_json, wrong_version, header_missing, empty_file, nonexistent, directory, expert_out_of_range,
        topk_row_length, nan_weight, weights_rows, layer_out_of_range, unknown_kind, step_backwards, truncated,
        footer_mismatch, gzip_cut, extra_field, second_header, after_footer, not_utf8, repeated_expert,
        lookahead_backwards, lookahead_odd_digit, newline_in_field_name,
        cache_below_topk, cache_per_layer_below_topk, no_cache_size, two_cache_sizes, per_layer_with_global,
        cache_gb_too_small, cache_zero, cache_gb_inf, cache_not_a_number,
        unknown_hardware, hardware_missing_field, hardware_not_json, hardware_not_utf8, hardware_directory,
        profile_other_model,
        unknown_policy, unknown_param, bad_param_value, malformed_spec, unhashable_param, static_other_shape,
        static_missing_trace,
        out_parent_is_file, timeline_parent_is_file,
    ]
]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return make_trace(tmp_path / "t.jsonl")


def test_valid_trace_replays(trace: Path) -> None:
    """The starting point of every case is good: the failures below come from the one thing broken."""
    assert len(trace.read_text().splitlines()) == N_LINES
    proc = run_replay(trace, *OK_CACHE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(case: Case, tmp_path: Path, trace: Path) -> None:
    args, fragments = case.make(tmp_path, trace)
    proc = run_replay(*args)
    err = proc.stderr.removesuffix("\n")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr!r}"
    assert err.strip(), "no message on stderr"
    assert "\n" not in err, f"more than one line on stderr: {proc.stderr!r}"
    missing = [f for f in fragments if f not in err]
    assert not missing, f"message {err!r} lacks {missing}"


def test_truncated_trace_with_allow_truncated(trace: Path) -> None:
    edit_lines(trace, lambda ls: ls[:-1])
    proc = run_replay(trace, *OK_CACHE, "--allow-truncated")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "truncated" in proc.stderr
    assert "hit rate" in proc.stdout


def test_gzip_trace_is_valid_before_the_cut(tmp_path: Path) -> None:
    """The cut gzip case fails because of the cut: the whole file reads back."""
    gz = make_trace(tmp_path / "big.jsonl.gz", n_calls=2000)
    with gzip.open(gz, "rt") as fh:
        assert json.loads(fh.readlines()[-1])["kind"] == "footer"
    proc = run_replay(gz, *OK_CACHE)
    assert proc.returncode == 0, proc.stderr
