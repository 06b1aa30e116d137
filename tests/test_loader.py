"""The loader for models bigger than the device: a real-format sharded bf16 checkpoint (Mixtral's
config scaled down, per-expert w1/w2/w3 keys that transformers fuses on load) goes through the same
path as a real one: dense weights in the checkpoint's dtype, experts into the host tier (never a
second full copy), exact against the unoffloaded eager model, a miss moving the dtype's bytes.
Memory is planned before loading and a run that cannot fit is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from runtime import memory as memory_mod  # noqa: E402
from runtime.checkpoints import build_checkpoint, checkpoint_bytes, scaled_mixtral  # noqa: E402
from runtime.loader import open_model  # noqa: E402
from runtime.memory import MemoryError_  # noqa: E402
from runtime.models import load_model  # noqa: E402
from runtime.offload import OffloadError, OffloadSession, expert_similarity, find_moe_layers, offload  # noqa: E402
from runtime.tiers import attached_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINK = "emulated:100GB/s"
# ~26 MB of bf16 weights in 7 shards: 4 layers of 8 experts of 3 x 256 x 512
SMALL = scaled_mixtral(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(SMALL, tmp_path_factory.mktemp("ckpt") / "mixtral-small", max_shard_size="4MB")


def _ids(batch: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 1024, (batch, length), generator=torch.Generator().manual_seed(1))


def test_fixture_is_sharded_bf16_in_the_checkpoint_format(ckpt: Path) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 4
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in index["weight_map"]  # Mixtral's own format
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    assert 20e6 < checkpoint_bytes(ckpt) < 40e6


def test_experts_go_to_the_host_tier_in_the_checkpoint_dtype(ckpt: Path) -> None:
    model, _ = load_model(str(ckpt), experts="host")
    store = attached_store(model)
    assert store is not None and store.dtype == torch.bfloat16
    layers = find_moe_layers(model)
    for ly in layers:  # the experts modules hold meta tensors of the full shape: no memory, true structure
        assert all(p.is_meta for p in ly.experts.parameters())
        assert ly.experts.gate_up_proj.shape == (8, 2 * 512, 256)
    dense = [p for p in model.parameters() if not p.is_meta]
    assert dense and all(p.dtype == torch.bfloat16 for p in dense)
    assert len(store.buffers) == 8 * 4 and store.expert_bytes == 3 * 256 * 512 * 2
    # the host tier holds the checkpoint's expert bytes once
    assert store.pinned_bytes + store.pageable_bytes == 8 * 4 * store.expert_bytes
    with pytest.raises(OffloadError, match="offloaded to the host tier"), torch.no_grad():
        model(_ids())  # outside a session: one line, not a meta-tensor error


def test_offloaded_checkpoint_is_exact_against_eager_and_moves_bf16_bytes(ckpt: Path) -> None:
    ref, _ = load_model(str(ckpt))  # the whole model, unoffloaded, eager experts
    ref.set_experts_implementation("eager")
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        want_gen = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    del ref
    model, _ = load_model(str(ckpt), experts="host")
    with offload(model, "lru", cache_per_layer=2, link=LINK) as s, torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(gen, want_gen)
    m = s.metrics
    assert m["misses"] > 0 and m["bytes_h2d"] == m["misses"] * 3 * 256 * 512 * 2
    # the session left the model offloaded (the loader's store), and a second session reuses it
    assert attached_store(model) is not None and all(p.is_meta for p in find_moe_layers(model)[0].experts.parameters())
    with offload(model, "fifo", cache_experts=3, link=LINK), torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want)


def test_dtype_override(ckpt: Path) -> None:
    model, _ = load_model(str(ckpt), dtype="fp32", experts="host")
    store = attached_store(model)
    assert store is not None and store.dtype == torch.float32 and store.expert_bytes == 3 * 256 * 512 * 4
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_session_on_a_whole_model_gives_the_weights_back_where_they_were() -> None:
    model, _ = load_model("tiny-mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with offload(model, "lru", cache_per_layer=2, link=LINK):
        assert all(p.is_meta for p in find_moe_layers(model)[0].experts.parameters())
    for n, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n]), n
    assert attached_store(model) is None


def test_similarity_from_the_host_tier_equals_from_the_weights() -> None:
    whole, _ = load_model("tiny-olmoe")
    want = expert_similarity(find_moe_layers(whole))
    model, _ = load_model("tiny-olmoe", experts="host")
    got = expert_similarity(find_moe_layers(model), store=attached_store(model))
    assert got == want


def test_memory_is_planned_before_loading(monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> None:
    """A run that cannot fit is refused in one line with the numbers, and nothing is loaded."""
    loaded = []
    import runtime.loader as loader_mod

    monkeypatch.setattr(loader_mod, "load_model", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(memory_mod, "device_budget", lambda dev: (40 * 2**20, "a test budget of 40 MiB"))
    with pytest.raises(MemoryError_) as exc:  # the host tier alone is 24 MiB, dense 3 MiB, reserve > 256 MiB
        open_model(str(ckpt), cache_per_layer=2, prompts=["hello"], new_tokens=4)
    msg = str(exc.value)
    assert "\n" not in msg and "even with the smallest cache (8 slots)" in msg
    assert "a test budget of 40 MiB" in msg and "dense " in msg and "reserve " in msg
    assert not loaded
    # enough for the smallest cache but not for the one asked: says how many slots fit
    from runtime.loader import skeleton

    _, spec, config = skeleton(str(ckpt), None)
    smallest = memory_mod.plan_memory(spec, config, torch.device("cpu"), 2, prompt_tokens=5, new_tokens=4)
    spare = smallest.need_bytes + 10 * spec.expert_bytes
    monkeypatch.setattr(memory_mod, "device_budget", lambda dev: (spare, "a test budget"))
    with pytest.raises(MemoryError_, match=r"a cache of 32 slots does not fit .* at most 12 slots fit"):
        open_model(str(ckpt), cache_experts=32, prompts=["hello"], new_tokens=4)
    assert not loaded


def test_plan_counts_what_the_run_allocates() -> None:
    model, _ = load_model("tiny-mixtral")
    s = OffloadSession(model, "lru", cache_per_layer=2, link=LINK)
    plan = memory_mod.plan_memory(s.spec, model.config, torch.device("cpu"), s.cache.capacity, batch=2, prompt_tokens=10,
                                  new_tokens=5)
    assert plan.slot_bytes == s.cache.capacity * s.spec.expert_bytes
    assert plan.dense_bytes == s.spec.dense_bytes
    # keys and values of 2 sequences x 15 positions x 4 layers x 2 heads x 16 dims, float32
    assert plan.kv_bytes == 2 * 2 * 15 * 4 * 2 * 16 * 4
    assert plan.need_bytes == plan.dense_bytes + plan.slot_bytes + plan.reserve_bytes + plan.host_tier_bytes


def test_pin_budget_splits_the_arena() -> None:
    """The pin cap in bytes: a layer straddling it gets a pinned and a pageable chunk (on CUDA); on
    a CPU-only machine nothing is pinned and everything is counted pageable."""
    model, _ = load_model("tiny-mixtral")
    layers = find_moe_layers(model)
    from runtime.tiers import ExpertStore

    store = ExpertStore(layers, pin=False, pin_bytes=0)
    assert store.pinned_bytes == 0 and store.pageable_bytes == 8 * 4 * store.expert_bytes
    assert store.pinned_fraction == 0.0
    if torch.cuda.is_available():
        st = ExpertStore(layers, pin=True, pin_bytes=int(11.5 * store.expert_bytes))
        assert st.pinned_bytes == 11 * store.expert_bytes and len(st.pinned) == 11


def test_pageable_copies_cost_more_in_the_simulator() -> None:
    from lab.hardware import PAGEABLE_FACTOR, LinkProfile

    pinned = LinkProfile(h2d_gbps=20, d2h_gbps=20, latency_us=5)
    assert pinned.effective_h2d_gbps() == 20
    assert LinkProfile(h2d_gbps=20, d2h_gbps=20, latency_us=5, pinned=False).effective_h2d_gbps() == 20 * PAGEABLE_FACTOR
    half = LinkProfile(h2d_gbps=20, d2h_gbps=20, latency_us=5, pinned_fraction=0.5, pageable_gbps=5)
    assert half.effective_h2d_gbps() == pytest.approx(1 / (0.5 / 20 + 0.5 / 5))
    # written when set, left out when not (profiles without them dump as before)
    assert half.model_dump()["pageable_gbps"] == 5 and "pageable_gbps" not in pinned.model_dump()
    assert LinkProfile.model_validate(half.model_dump()) == half


def test_the_host_holds_the_checkpoint_once(ckpt: Path) -> None:
    """In a fresh process: the anonymous memory the loader adds (the host tier plus the dense part,
    after loading and offloading) is the checkpoint's bytes once, not twice. At this size a peak-RSS
    ratio is dominated by torch's own fixed costs (tens of MB of lazily imported code and first-call
    buffers), so the peak RSS / checkpoint figure (<= 1.3x) is measured by bench/big_checkpoint.py on
    a 3.4 GB checkpoint instead (docs/benchmarks.md)."""
    code = (
        "import json, torch, transformers\n"
        "from transformers import MixtralForCausalLM\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        "from runtime.models import load_model\n"
        "base = anon()\n"
        f"model, _ = load_model({str(ckpt)!r}, experts='host')\n"
        "print(json.dumps({'added': anon() - base}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    added = json.loads(out.stdout.strip().splitlines()[-1])["added"]
    size = checkpoint_bytes(ckpt)
    assert 0.9 * size < added <= 1.1 * size + 8 * 2**20, (added, size)


def test_batched_recording_replays_with_identical_counts(tmp_path: Path) -> None:
    """Prompts run two at a time, left-padded: every step line lists its batch's sequences, and the
    simulator's replay of the trace counts what the run counted."""
    from lab.cache import CacheConfig
    from runtime.record import record
    from sim.replay import replay
    from traces.io import TraceReader
    from traces.schema import StepRecord

    prompts = ["offloading experts", "a second, longer prompt about caches", "third"]
    for name, size in (("tiny-qwen2-moe", {"cache_per_layer": 3}), ("tiny-mixtral", {"cache_experts": 5})):
        trace = tmp_path / f"{name}.jsonl.gz"
        m = record(name, prompts, trace, policy="lru", link=LINK, max_new_tokens=4, batch_size=2, progress=False, **size)
        r = replay(trace, "lru", CacheConfig(experts=size.get("cache_experts"), per_layer=size.get("cache_per_layer")),
                   "rtx4090").metrics
        for key in ("accesses", "hits", "inflight_hits", "misses", "bytes_h2d", "layer_calls", "steps"):
            assert r[key] == m[key], (name, key, r[key], m[key])
        steps = [rec for rec in TraceReader(trace) if isinstance(rec, StepRecord)]
        assert [s.seq_ids for s in steps] == [[0, 1]] * 4 + [[2]] * 4
        assert TraceReader(trace).header.recording.decoding["batch_size"] == 2


def test_batched_run_of_a_lossless_policy_is_exact() -> None:
    from runtime.run import run

    m = run("tiny-mixtral", "lru", cache_per_layer=2, link=LINK, prompts=["one", "a longer second prompt", "3"],
            max_new_tokens=3, batch_size=2)
    assert m["token_agreement"] == 1.0 and m["kl_divergence"] == 0.0 and m["batch_size"] == 2
    assert m["peak_host_rss_bytes"] > 0 and m["peak_device_allocated_bytes"] is None


def test_plan_of_mixtral_8x7b_on_a_24gb_card(capsys: pytest.CaptureFixture[str]) -> None:
    """The arithmetic docs/runtime.md quotes, from Mixtral-8x7B's config alone (no weights)."""
    from runtime.plan import main

    assert main(["--model", "config:mixtral-8x7b", "--budget-gib", "23.5", "--prompt-tokens", "2048",
                 "--new-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "336.0 MiB each; all 256: 84.00 GiB" in out and "dense      2.99 GiB" in out
    assert "reserve    1.00 GiB: KV 0.28 GiB" in out and "at most 59 fit" in out
    doc = (ROOT / "docs" / "runtime.md").read_text()
    assert "--cache-experts 59" in doc and "2.99 GiB" in doc and "1.00 GiB" in doc
    assert main(["--model", "config:mixtral-8x7b", "--budget-gib", "23.5", "--cache-per-layer", "2"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
