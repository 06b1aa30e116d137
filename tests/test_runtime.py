"""The torch runtime: exactness against the un-offloaded model, and the same counts as the simulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")

from lab.cache import CacheConfig  # noqa: E402
from policies import Future  # noqa: E402
from runtime import OffloadError, offload  # noqa: E402
from runtime.links import LinkError, parse_link  # noqa: E402
from runtime.models import TINY, load_model  # noqa: E402
from runtime.record import record  # noqa: E402
from sim.replay import replay  # noqa: E402
from traces.io import TraceReader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINK = "emulated:200GB/s"
LOSSLESS = ["lru", "lfu", "lfu(decay=0.8)", "fifo", "random(seed=3)"]


def _ids(seed: int = 1, batch: int = 2, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    model, name = load_model(request.param)
    model.set_experts_implementation("eager")  # the reference: transformers' own per-expert loop
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    return model, name, ids, logits, gen


def _top_k(model) -> int:  # type: ignore[no-untyped-def]
    return int(model.config.num_experts_per_tok)


@pytest.mark.parametrize("policy", LOSSLESS)
def test_lossless_policies_are_exact(tiny, policy: str) -> None:  # type: ignore[no-untyped-def]
    model, name, ids, ref_logits, ref_gen = tiny
    k = _top_k(model)
    for size in ({"cache_per_layer": k}, {"cache_experts": k + 1}, {"cache_per_layer": k + 2, "partition": None}):
        size = {a: b for a, b in size.items() if b is not None}
        with offload(model, policy, link=LINK, **size) as s, torch.no_grad():
            logits = model(ids).logits
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(logits, ref_logits), (name, policy, size)
        assert torch.equal(gen, ref_gen), (name, policy, size)
        m = s.metrics
        assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"] > 0
        assert m["bytes_h2d"] == m["misses"] * s.spec.expert_bytes
    with torch.no_grad():  # uninstalled: the model is whole again
        assert torch.equal(model(ids).logits, ref_logits)


def test_device_memory_of_experts_is_released(tiny) -> None:  # type: ignore[no-untyped-def]
    model, *_ = tiny
    before = sum(p.numel() for p in model.parameters() if not p.is_meta)
    with offload(model, "lru", cache_per_layer=_top_k(model), link=LINK) as s:
        # the experts' parameters are meta tensors of the same shape: no memory behind them
        during = sum(p.numel() for p in model.parameters() if not p.is_meta)
        assert sum(p.numel() for p in model.parameters()) == before
        slots = s.pool.buf.numel()
    expert_numel = s.spec.expert_bytes // 4 * s.spec.num_experts * s.spec.num_moe_layers  # float32
    assert before - during == expert_numel
    assert slots == s.cache.capacity * s.spec.expert_bytes // 4 < expert_numel


@pytest.mark.parametrize("name", sorted(TINY))
def test_recorded_trace_replays_with_identical_counts(tmp_path: Path, name: str) -> None:
    """DESIGN section 1: hit and miss counts of a replay and of the run it was recorded from are identical."""
    prompts = ["offloading experts", "a second, longer prompt about caches"]
    for policy, size in [("lru", {"cache_per_layer": 3}), ("lfu(decay=0.9)", {"cache_experts": 7}), ("fifo", {"cache_experts": 9}),
                         ("random(seed=2)", {"cache_per_layer": 4}), ("static", {"cache_per_layer": 5})]:
        if name in ("tiny-olmoe", "tiny-qwen3-moe"):  # top-4: needs more slots
            size = {k: v + 3 for k, v in size.items()}
        trace = tmp_path / f"{name}.jsonl.gz"
        spec = policy
        if policy == "static":  # pinned from a profiling run of the same prompts
            prof = tmp_path / "profile.jsonl.gz"
            record(name, prompts, prof, max_new_tokens=6, link=LINK, progress=False)
            spec = f"static(trace={prof})"
        m = record(name, prompts, trace, policy=spec, link=LINK, max_new_tokens=6, progress=False, **size)
        cache = CacheConfig(experts=size.get("cache_experts"), per_layer=size.get("cache_per_layer"))
        r = replay(trace, spec, cache, "rtx4090").metrics
        for key in ("accesses", "hits", "inflight_hits", "misses", "bytes_h2d", "layer_calls", "steps"):
            assert r[key] == m[key], (name, policy, key, r[key], m[key])


def test_belady_runs_only_with_the_trace_of_its_run(tmp_path: Path) -> None:
    model, name = load_model("tiny-mixtral")
    ids = _ids(batch=1)
    trace = tmp_path / "run.jsonl"
    record(name, ["the prompt"], trace, policy="lru", cache_per_layer=2, link=LINK, max_new_tokens=4, progress=False)
    with pytest.raises(OffloadError, match="oracle"):
        with offload(model, "belady", cache_per_layer=2, link=LINK):
            pass
    m = record(name, ["the prompt"], tmp_path / "b.jsonl", policy="belady", cache_per_layer=2, link=LINK, max_new_tokens=4,
               progress=False, future=Future.from_trace(trace))
    r = replay(trace, "belady", CacheConfig(per_layer=2), "rtx4090").metrics
    assert (m["hits"], m["misses"]) == (r["hits"], r["misses"])
    lru = replay(trace, "lru", CacheConfig(per_layer=2), "rtx4090").metrics
    assert r["hits"] >= lru["hits"]
    with torch.no_grad(), pytest.raises(Exception, match="does not match"):  # another run: refused
        with offload(model, "belady", cache_per_layer=2, link=LINK, future=Future.from_trace(trace)):
            model(ids[:, :3])


def test_trace_fields_and_validity(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl.gz"
    record("tiny-qwen2-moe", ["hello world"], trace, policy="lru", cache_per_layer=3, link=LINK, max_new_tokens=3,
           lookahead=2, progress=False)
    reader = TraceReader(trace)
    h = reader.header
    assert h.fields.probs and h.fields.lookahead and h.fields.importance and h.fields.measured and h.fields.plan
    assert h.recording.policy == "lru" and h.model.arch == "qwen2_moe" and h.model.num_shared_experts == 1
    recs = list(reader.layer_records())
    assert recs[0].phase == "prefill" and recs[-1].phase == "decode"
    first = recs[0]
    assert len(first.probs[0]) == h.model.num_experts and abs(sum(first.probs[0]) - 1) < 1e-5
    assert set(first.lookahead) == {"1", "2"} and all(0 <= x <= 1 for x in first.importance)
    assert first.measured.end_ns >= first.measured.start_ns
    # the router's own top-k is the most probable experts: probs agree with topk
    row = first.probs[0]
    assert set(first.topk[0]) == set(sorted(range(len(row)), key=lambda e: -row[e])[: h.model.top_k])


def test_interrupted_recording_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import record as rec_mod

    out = tmp_path / "t.jsonl"
    out.write_text("previous\n")
    calls = {"n": 0}
    orig = rec_mod.Recorder.on_layer

    def boom(self, ev):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return orig(self, ev)

    monkeypatch.setattr(rec_mod.Recorder, "on_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        record("tiny-mixtral", ["abc"], out, policy="lru", cache_per_layer=2, link=LINK, max_new_tokens=3, progress=False)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_bad_settings_are_one_clear_error() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(OffloadError, match="no MoE layer"):
        offload(dense, "lru", cache_experts=4).__enter__()
    model, _ = load_model("tiny-mixtral")
    with pytest.raises(OffloadError, match="cache too small"):
        offload(model, "lru", cache_per_layer=1).__enter__()
    with pytest.raises(OffloadError, match="larger than the model"):
        offload(model, "lru", cache_experts=10_000).__enter__()
    with pytest.raises(LinkError, match="unknown link"):
        parse_link("pcie:fast")
    with pytest.raises(OffloadError, match="needs the model on a CUDA device"):
        offload(model, "lru", cache_experts=4, link="cuda").__enter__()
    assert parse_link("emulated:16GB/s,10us").latency_s == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "nope-model", "--prompts", "{p}", "-o", "{o}"], "unknown model"),
        (["--model", "tiny-mixtral", "--prompts", "{o}.missing", "-o", "{o}"], "no such prompts file"),
        (["--model", "tiny-mixtral", "--prompts", "{p}", "-o", "{o}", "--policy", "lru", "--cache-per-layer", "1"], "cache too small"),
        (["--model", "tiny-mixtral", "--prompts", "{p}", "-o", "{o}", "--policy", "lru"], "needs a cache size"),
        (["--model", "tiny-mixtral", "--prompts", "{p}", "-o", "{o}", "--link", "fast"], "unknown link"),
        (["--model", "tiny-mixtral", "--prompts", "{p}", "-o", "{o}", "--policy", "belady", "--cache-per-layer", "2"], "oracle"),
        (["--model", "tiny-mixtral", "--prompts", "{p}", "-o", "{o}", "--policy", "nope", "--cache-per-layer", "2"], "unknown policy"),
    ],
)
def test_record_cli_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    p = tmp_path / "p.txt"
    p.write_text("hello\n")
    o = tmp_path / "o.jsonl"
    argv = [a.format(p=p, o=o) for a in args]
    res = subprocess.run([sys.executable, "-m", "runtime.record", *argv, "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert res.returncode == 2, res.stderr
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert fragment in err[0]
    assert not o.exists()


def test_record_cli_writes_a_trace_sim_replay_reads(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("hello\nworld\n")
    o = tmp_path / "t.jsonl.gz"
    res = subprocess.run(
        [sys.executable, "-m", "runtime.record", "--model", "tiny-deepseek-v3", "--prompts", str(p), "-o", str(o),
         "--max-new-tokens", "3", "--policy", "lru", "--cache-per-layer", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    r = subprocess.run([sys.executable, "-m", "sim.replay", str(o), "--policy", "lru", "--cache-per-layer", "2", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "hit rate" in r.stdout, r.stderr
    assert TraceReader(o).header.model.moe_layers == [1, 2, 3]  # DeepSeek-V3: the first layer is dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_exactness_and_counts() -> None:
    model, _ = load_model("tiny-mixtral", device="cuda")
    model.set_experts_implementation("eager")
    ids = _ids().cuda()
    with torch.no_grad():
        ref = model(ids).logits
    with offload(model, "lru", cache_per_layer=2, link="cuda") as s, torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref)
    assert s.metrics["misses"] > 0


class _NextLayerPrefetch:
    """A test-only policy: LRU, plus a prefetch of this call's expert ids in the next layer."""

    @staticmethod
    def make():  # type: ignore[no-untyped-def]
        from policies import DemandPolicy, LayerPlan

        class NextLayer(DemandPolicy):
            name = "test-next-layer"

            def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
                return next((k for k in cache.least_recent(part) if k not in exclude), None)

            def plan(self, req, cache) -> LayerPlan:  # type: ignore[no-untyped-def]
                plan = super().plan(req, cache)
                if req.layer + 1 < self.model.num_moe_layers:
                    want = [(req.layer + 1, e) for e in req.experts_in_access_order() if (req.layer + 1, e) not in cache]
                    plan.prefetch = self.make_room(cache, want, set(plan.execute), force=False)
                return plan

        return NextLayer()


def test_a_prefetching_policy_runs_exact_and_counts_add_up() -> None:
    """A prefetching policy object (per-layer cache: prefetches take the next layer's slots)."""
    from runtime.offload import OffloadSession

    model, name = load_model("tiny-mixtral")
    model.set_experts_implementation("eager")
    ids = _ids(batch=1)
    with torch.no_grad():
        ref = model(ids).logits
    pol = _NextLayerPrefetch.make()
    s = OffloadSession(model, pol, cache_per_layer=3, link=LINK)
    s.install()
    try:
        with torch.no_grad():
            out = model(ids).logits
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        s.uninstall()
    assert torch.equal(out, ref)
    m = s.metrics
    assert m["prefetches"] > 0
    assert m["hits"] + m["inflight_hits"] + m["misses"] == m["accesses"]
    assert m["bytes_h2d"] == (m["misses"] + m["prefetches"]) * s.spec.expert_bytes


class _NextCallOracle:
    """A test-only oracle: LRU, plus a prefetch of the next layer call's experts, known from a
    previous identical run (the future)."""

    @staticmethod
    def make():  # type: ignore[no-untyped-def]
        from policies import DemandPolicy, LayerPlan

        class NextCall(DemandPolicy):
            name = "test-next-call"
            needs_future = True

            def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
                super().reset(model, cache, costs, future)
                self.calls, self.i = future.calls, 0

            def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
                return next((k for k in cache.least_recent(part) if k not in exclude), None)

            def plan(self, req, cache) -> LayerPlan:  # type: ignore[no-untyped-def]
                plan = super().plan(req, cache)
                self.i += 1
                nxt = self.calls[self.i] if self.i < len(self.calls) else []
                want = [k for k in nxt if k[0] != req.layer and k not in cache]
                plan.prefetch = self.make_room(cache, want, set(plan.execute), force=False)
                return plan

        return NextCall()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_overlaps_compute() -> None:
    """On the copy streams, prefetches overlap compute: with experts whose copies cost as much as a
    layer's compute (small-mixtral, 42 MiB each) and top-k slots per layer, prefetching the next
    call's experts (an oracle: a first identical run gave them) makes decode steps faster than
    demand loading in the same process (a ratio, not a timing), with the same outputs."""
    model, _ = load_model("small-mixtral", device="cuda")
    ids = _ids(batch=1).cuda()
    calls: list = []
    runs = {}
    for label in ("warm-up", "demand", "prefetch"):
        pol = _NextCallOracle.make() if label == "prefetch" else "lru"
        kw = {"future": Future(calls)} if label == "prefetch" else {}
        with offload(model, pol, cache_per_layer=2, link="cuda", **kw) as s, torch.no_grad():
            if label == "demand":
                s.on_layer = lambda ev: calls.append(ev.request.keys_in_access_order())
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
        runs[label] = (out, s.metrics)
    (out_d, m_d), (out_p, m_p) = runs["demand"], runs["prefetch"]
    assert torch.equal(out_d, out_p)
    assert m_p["prefetches"] > 0 and m_p["misses"] < m_d["misses"], (m_d, m_p)
    assert m_p["tpot_s"] < m_d["tpot_s"], (m_d["tpot_s"], m_p["tpot_s"])
