"""The model zoo: the shipped checkpoints load by name, are what their presets say, learned something
(held-out perplexity far below their untrained twins'), and their shipped traces have routing with
structure (per-layer LRU beats uniform routing's C/N). Nothing here trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from lab.cache import CacheConfig  # noqa: E402
from runtime.models import ModelError, load_model  # noqa: E402
from runtime.record import encode  # noqa: E402
from runtime.zoo import CHECKPOINTS, LOG_FILE, NAMES, checkpoint_dir  # noqa: E402
from runtime.zoo.corpus import held_out_blocks, stdlib_corpus  # noqa: E402
from runtime.zoo.presets import PRESETS, build_model, mean_nll, perplexity  # noqa: E402
from sim.replay import replay  # noqa: E402
from traces.io import TraceReader  # noqa: E402
from traces.schema import LayerRecord, StepRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCH = {"coarse": ("MixtralForCausalLM", 8, 2), "fine": ("OlmoeForCausalLM", 32, 4)}
TRACE = {n: ROOT / "traces" / f"zoo-{n}.jsonl.gz" for n in NAMES}


def _log(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((CHECKPOINTS / name / LOG_FILE).read_text(encoding="utf-8"))


def _experts(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_local_experts", None) or cfg.num_experts)


@pytest.fixture(scope="module", params=NAMES)
def zoo(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    model, name = load_model(f"zoo:{request.param}")
    return request.param, model, name


def test_checkpoints_load_with_their_architecture(zoo) -> None:  # type: ignore[no-untyped-def]
    preset, model, name = zoo
    arch, experts, top_k = ARCH[preset]
    assert type(model).__name__ == arch
    assert (_experts(model), int(model.config.num_experts_per_tok)) == (experts, top_k)
    assert PRESETS[preset].config["num_experts_per_tok"] == top_k
    assert all(p.dtype == torch.float32 for p in model.parameters())  # saved in float16, loaded as float32
    assert not model.training
    assert Path(name).resolve() == checkpoint_dir(f"zoo:{preset}") == (CHECKPOINTS / preset).resolve()


def test_encode_uses_the_checkpoint_tokenizer(zoo) -> None:  # type: ignore[no-untyped-def]
    _, model, name = zoo
    from transformers import AutoTokenizer

    text = "def isleap(year):\n    return year % 4 == 0\n"
    ids = encode(model, name, text)
    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    assert ids[0, 0].item() == tok.bos_token_id == 1
    assert ids.shape[1] < len(text.encode()) / 2  # BPE tokens, not the byte fallback of tiny models
    assert tok.decode(ids[0], skip_special_tokens=True) == text


def test_checkpoint_size_budget() -> None:
    total = sum(f.stat().st_size for n in NAMES for f in (CHECKPOINTS / n).iterdir() if f.is_file())
    assert total <= 10_000_000
    for n in NAMES:
        assert (CHECKPOINTS / n / "model.safetensors").is_file()
        assert (CHECKPOINTS / n / "tokenizer.json").is_file()


def test_unknown_zoo_model_is_refused() -> None:
    with pytest.raises(ModelError, match="unknown zoo model 'zoo:nope'"):
        load_model("zoo:nope")


def test_trained_far_below_untrained_twin(zoo) -> None:  # type: ignore[no-untyped-def]
    preset, model, name = zoo
    log = _log(preset)
    assert log["preset"] == preset and log["steps"] > 0
    assert log["final"]["held_out_perplexity"] < log["untrained_twin"]["held_out_perplexity"] / 10
    # the untrained twin, rebuilt here (same config and seed), on a few held-out blocks
    from transformers import AutoConfig

    blocks = held_out_blocks(name, length=128, max_blocks=4)
    assert blocks.shape == (4, 128)
    twin = build_model(AutoConfig.from_pretrained(name, local_files_only=True), log["seed"])
    twin_ppl = perplexity(mean_nll(twin, blocks))
    trained_ppl = perplexity(mean_nll(model, blocks))
    assert twin_ppl > 0.5 * log["config"]["vocab_size"]  # an untrained model guesses about uniformly
    assert log["final"]["held_out_perplexity"] < twin_ppl / 10
    assert trained_ppl < twin_ppl / 10


def test_held_out_split_is_by_file() -> None:
    c = stdlib_corpus()
    assert c.train and c.held_out and not set(c.train) & set(c.held_out)
    assert 0.05 < len(c.held_out) / (len(c.train) + len(c.held_out)) < 0.2
    prompts = [json.loads(line) for line in (ROOT / "examples" / "zoo-prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 8
    for p in prompts:  # the prompts come from held-out files, verbatim
        rel = re.match(r"Lib/(\S+) ", p["source"]).group(1)  # type: ignore[union-attr]
        assert rel in c.held_out
        assert p["prompt"] in c.text(rel)


@pytest.mark.parametrize("preset", NAMES)
def test_shipped_traces(preset: str) -> None:
    reader = TraceReader(TRACE[preset])
    h = reader.header
    arch, experts, top_k = ARCH[preset]
    assert (h.model.num_experts, h.model.top_k, h.model.num_moe_layers) == (experts, top_k, 4)
    assert h.fields.probs and h.fields.lookahead and h.fields.importance
    phases = {"prefill": 0, "decode": 0}
    seqs = set()
    for rec in reader:
        if isinstance(rec, StepRecord):
            phases[rec.phase] += 1
            seqs.update(rec.seq_ids)
        elif isinstance(rec, LayerRecord) and rec.phase == "decode":
            assert rec.probs is not None and len(rec.probs[0]) == experts and rec.importance is not None
            assert rec.lookahead is not None and (bool(rec.lookahead) or rec.layer == 3)  # the last layer sees no later one
    assert phases["prefill"] == 8 and phases["decode"] >= 8 * 31
    assert seqs == set(range(8))


@pytest.mark.parametrize(("preset", "size"), [("coarse", 2), ("coarse", 4), ("fine", 4), ("fine", 8)])
def test_lru_beats_uniform_routing(preset: str, size: int) -> None:
    """Per layer: LRU with `size` slots per layer hits more often than C/N, the hit rate of uniform
    independent routing at the same cache size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_zoo_structure", ROOT / "bench" / "zoo_structure.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from sim.curves import read_calls, simulate_hits

    calls = read_calls(TRACE[preset])
    n = calls.model.num_experts
    for layer in range(calls.model.num_moe_layers):
        sub = bench.layer_calls(calls, layer)
        assert simulate_hits(sub, "lru", CacheConfig(per_layer=size)) / sub.accesses > size / n, (preset, size, layer)
    assert replay(TRACE[preset], "lru", CacheConfig(per_layer=size)).metrics["hit_rate"] > size / n


def test_docs_tables_are_current() -> None:
    """docs/zoo.md pastes bench/zoo_structure.py's output between markers: it must be current."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("bench_zoo_structure", ROOT / "bench" / "zoo_structure.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.main()
    text = (ROOT / "docs" / "zoo.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- zoo-structure:begin -->\n(.*?)<!-- zoo-structure:end -->", text, re.S)
    assert m, "docs/zoo.md: no zoo-structure markers"
    assert m.group(1) == buf.getvalue()
