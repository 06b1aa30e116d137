"""The docs say what the code does: the examples in docs/*.md run, and the pasted tables are the
scripts' current output.

Each check reads the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers in a doc, so
the doc and the code cannot drift apart silently.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import re
from pathlib import Path
from types import ModuleType

import pytest

from lab.cache import CacheConfig
from sim.engine import request_from_record
from sim.replay import replay
from traces.io import TraceReader
from traces.schema import LayerRecord, StepRecord

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def between(doc: str, name: str) -> str:
    """The text between the doc's `<!-- name:begin -->` and `<!-- name:end -->` markers."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    m = re.search(rf"<!-- {re.escape(name)}:begin -->\n(.*?)<!-- {re.escape(name)}:end -->", text, re.S)
    assert m, f"docs/{doc}: no {name} markers"
    return m.group(1)


def fenced(block: str, lang: str) -> str:
    """The body of the one fenced code block of language `lang` in `block`."""
    m = re.fullmatch(rf"\s*```{lang}\n(.*?)```\s*", block, re.S)
    assert m, f"expected exactly one ```{lang} block"
    return m.group(1)


def bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def output_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert fn(*args) in (0, None)
    return buf.getvalue()


# -- trace-format.md --------------------------------------------------------------------------------
EXAMPLE = fenced(between("trace-format.md", "example-trace"), "jsonl")


@pytest.mark.parametrize("name", ["example.jsonl", "example.jsonl.gz"])
def test_example_trace_parses(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    data = EXAMPLE.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert len(EXAMPLE.splitlines()) == 5  # header, two layer records, a step record, the footer

    reader = TraceReader(path)
    h = reader.header
    assert (h.model.name, h.model.num_layers, h.model.moe_layers, h.model.num_experts, h.model.top_k) == (
        "tiny-moe", 3, [1, 2], 4, 2,
    )
    assert h.model.expert_bytes == 3 * h.model.hidden_size * h.model.moe_intermediate_size * 2 == 768
    assert h.fields.importance and not h.fields.probs
    records = list(reader)
    assert [type(r) for r in records] == [LayerRecord, LayerRecord, StepRecord]
    assert not reader.truncated
    assert reader.footer is not None and (reader.footer.steps, reader.footer.layer_records) == (1, 2)

    # the access orders the doc states: 0, 2, 3 (summed weights 1.1, 0.6, 0.3), then a tie: 1 before 3
    layers = [r for r in records if isinstance(r, LayerRecord)]
    assert [request_from_record(r).experts_in_access_order() for r in layers] == [[0, 2, 3], [1, 3]]


def test_example_trace_replays_as_the_doc_says(tmp_path: Path) -> None:
    path = tmp_path / "example.jsonl"
    path.write_text(EXAMPLE)
    m = replay(path, "lru", CacheConfig(experts=4), "rtx4090").metrics
    assert (m["accesses"], m["hits"], m["misses"], m["bytes_h2d"]) == (5, 0, 5, 3840)
    assert (m["prefill_steps"], m["decode_steps"]) == (1, 0)
    assert m["ttft_s"] is not None and m["tpot_s"] is None


def test_example_without_its_footer_is_truncated(tmp_path: Path) -> None:
    """What the doc says about truncation, on the doc's own example."""
    from traces.io import TraceError

    path = tmp_path / "cut.jsonl"
    path.write_text("".join(line + "\n" for line in EXAMPLE.splitlines()[:-1]))
    with pytest.raises(TraceError, match=r"cut\.jsonl:4: truncated: no footer line .*--allow-truncated"):
        list(TraceReader(path))
    reader = TraceReader(path, allow_truncated=True)
    assert len(list(reader)) == 3 and reader.truncated


def test_writer_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = fenced(between("trace-format.md", "writer-example"), "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/trace-format.md (writer example)", "exec"), {"__name__": "writer_example"})
    reader = TraceReader(tmp_path / "example.jsonl.gz")
    recs = list(reader.layer_records())
    assert len(recs) == 64 and reader.footer is not None and reader.footer.steps == 2
    assert [r.tokens for r in recs[:1] + recs[-1:]] == [5, 1]
    assert (tmp_path / "example.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file became the trace


def test_model_table_is_the_scripts_output() -> None:
    assert between("trace-format.md", "model_table") == output_of(bench("model_table").main)


# -- hardware.md ------------------------------------------------------------------------------------
def test_hardware_tables_are_the_scripts_output() -> None:
    mod = bench("hardware_table")
    assert between("hardware.md", "hardware_table") == output_of(mod.main, [])
    assert between("hardware.md", "hardware_table defaults") == output_of(mod.main, ["--section", "defaults"])


# -- simulator.md -----------------------------------------------------------------------------------
def test_simulator_doc_defines_every_metric(tmp_path: Path) -> None:
    path = tmp_path / "example.jsonl"
    path.write_text(EXAMPLE)
    res = replay(path, "lru", CacheConfig(experts=4), "rtx4090")
    text = (DOCS / "simulator.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert set(res.metrics) <= rows, set(res.metrics) - rows
    assert set(res.config) <= rows, set(res.config) - rows


# -- policies.md ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_policy_tables_are_the_scripts_output() -> None:
    """The simulator tables of docs/policies.md "Numbers" (about 45 s). The runtime quality tables come
    from the same script (`--section quality`, about 2 min; tests/test_policy_table.py checks what
    they show on a shorter text)."""
    mod = bench("policy_table")
    assert between("policies.md", "policy-table mixtral") == output_of(mod.main, ["--section", "mixtral"])
    assert between("policies.md", "policy-table zoo") == output_of(mod.main, ["--section", "zoo"])
