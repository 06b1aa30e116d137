"""Record the trace of an offloaded run (docs/design.md section 3): every routing decision, with the router's
probabilities, look-ahead guesses, token importance, the plan that ran and measured timings, and in
the header the cosine similarity of the experts' weights.

    python -m runtime.record --model M --prompts FILE [--max-new-tokens N] [--policy SPEC
        (--cache-experts N | --cache-per-layer K)] [--link L] -o traces/x.jsonl.gz

Without --policy the run keeps every expert (LRU with a cache of all of them): the routing is the
model's own, and the trace says which policy and cache produced it. The trace is written through a
temporary file: an interrupted recording leaves the previous file, or none.
"""

from __future__ import annotations

from runtime._extra import require

if __name__ == "__main__":
    require("runtime.record")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from policies import CacheError, CostModel, Future, PolicySpecError, load_plugins  # noqa: E402
from runtime.cli import (  # noqa: E402
    InputError,
    add_model_options,
    cache_sizes,
    check_out,
    positive,
    read_text,
    runtime_parser,
)
from runtime.links import LinkError, parse_link  # noqa: E402
from runtime.loader import open_model  # noqa: E402
from runtime.memory import MemoryError_  # noqa: E402
from runtime.models import ModelError  # noqa: E402
from runtime.offload import (  # noqa: E402
    LayerEvent,
    OffloadError,
    OffloadSession,
    StepRecordRT,
    find_moe_layers,
    model_spec,
    offload,
)
from traces.io import TraceWriter  # noqa: E402
from traces.schema import ExpertLoad, Fields, Header, LayerRecord, Measured, ModelSpec, Recording, StepRecord

TOOL_VERSION = "0.1.0"


RecordError = InputError  # the name callers and tests know


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a .txt file, or the `prompt` field of each line of a .jsonl file."""
    p = Path(path)
    prompts: list[str] = []
    for i, line in enumerate(read_text(p, "prompts").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{p}:{i}: bad JSON: {exc.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise RecordError(f"{p}:{i}: prompt: expected an object with a string 'prompt'")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise RecordError(f"{p}: no prompts in the file")
    return prompts


def encode(model: nn.Module, name: str, prompt: str) -> torch.Tensor:
    """Token ids: the checkpoint's own tokenizer, or (tiny models have none) UTF-8 bytes folded into
    the vocabulary above the special ids."""
    path = Path(name)
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return tok(prompt, return_tensors="pt").input_ids
    vocab = model.config.vocab_size
    ids = [3 + b % (vocab - 3) for b in prompt.encode("utf-8")] or [3]
    return torch.tensor([ids])


def pad_id(model: nn.Module) -> int:
    """The id that left-pads a batch: the config's pad token, else 0 (what the runtime always passed)."""
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def encode_batch(model: nn.Module, name: str, prompts: Sequence[str], pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts run together, left-padded with `pad` as `generate` expects."""
    rows = [encode(model, name, p)[0] for p in prompts]
    width = max(int(r.shape[0]) for r in rows)
    ids = torch.full((len(rows), width), pad if pad is not None else pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return ids, mask


class Recorder:
    """Turns a session's layer and step events into trace records, as they happen. The session
    computes the probabilities, look-ahead and importance (it is asked for them), so a policy that
    reads them and the trace see the same numbers."""

    def __init__(self, writer: TraceWriter, t0_ns: int):
        self.writer = writer
        self.t0 = t0_ns
        self.seq_ids: list[int] = [0]
        self.bar: Any = None  # a progress bar that moves once per decode step
        self.pending: list[LayerEvent] = []

    def on_layer(self, ev: LayerEvent) -> None:
        """Inside the step: only keep the event (the step's measured time should not include writing)."""
        self.pending.append(ev)

    def _write_layer(self, ev: LayerEvent) -> None:
        req = ev.request
        plan = ev.plan
        measured = Measured(
            start_ns=ev.start_ns - self.t0,
            end_ns=ev.end_ns - self.t0,
            stall_ns=ev.stall_ns,
            loads=[
                ExpertLoad(expert=c.key[1], start_ns=max(0, c.start_ns - self.t0), end_ns=max(0, c.end_ns - self.t0))
                for c in ev.loads
                if c.end_ns
            ],
        )
        look = req.lookahead
        self.writer.write(
            LayerRecord(
                step=ev.step,
                phase=ev.phase,  # type: ignore[arg-type]
                layer=ev.layer,
                tokens=req.tokens,
                topk=req.topk.tolist(),
                weights=req.weights.tolist(),
                probs=None if req.probs is None else req.probs.tolist(),
                lookahead=None if look is None else {str(k): v.tolist() for k, v in look.items()},
                importance=None if req.importance is None else req.importance.tolist(),
                plan={
                    "loads": [[ld.key[1], *(ld.victim or ())] for ld in plan.loads],
                    "prefetch": [[*ld.key, *(ld.victim or ())] for ld in plan.prefetch],
                    "cpu": [k[1] for k in plan.cpu],
                    "order": [k[1] for k in plan.order],
                },
                measured=measured,
            )
        )

    def on_step(self, st: StepRecordRT) -> None:
        """After the step's end was taken: write its layer records, then the step record."""
        for ev in self.pending:
            self._write_layer(ev)
        self.pending.clear()
        self.writer.write(
            StepRecord(step=st.step, phase=st.phase, seq_ids=list(self.seq_ids), latency_ns=max(0, st.end_ns - st.start_ns))  # type: ignore[arg-type]
        )
        if self.bar is not None:
            self.bar.update(len(self.seq_ids))  # one token per sequence: the prefill makes the first


def record(
    model_name: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    policy: str | None = None,
    cache_experts: int | None = None,
    cache_per_layer: int | None = None,
    cache_gb: float | None = None,
    link: str = "emulated:16GB/s",
    max_new_tokens: int = 32,
    lookahead: int = 2,
    seed: int = 0,
    prompt_source: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    future: Future | None = None,
    warmup: bool = True,
    signals: bool = True,
    costs: CostModel | Callable[[ModelSpec], CostModel] | None = None,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    pin_gb: float | None = None,
) -> dict[str, Any]:
    """Run the prompts `batch_size` at a time (each batch left-padded, each prompt a sequence of its
    own: every step record lists the batch's `seq_ids`), write the trace, return the session's
    metrics. `signals=False` records only what the policy itself reads (no probabilities,
    look-ahead, importance or weight similarity beyond it): the run then costs what it costs without a
    recorder, which is what validation measures. The model is opened with its experts in the host
    tier (`runtime.loader.open_model`, memory checked first); the untimed warm-up forward runs
    offloaded too, in a session of its own (same cache, `lru`), so nothing needs the whole model
    on the device.

    `costs` is the cost model the policy gets at `reset` (policies that weigh costs, such as
    `fiddler`, need the one the simulator will use): a `CostModel`, or a function of the run's
    `ModelSpec` that returns one (`runtime.validate` passes the profile's `cost_model`). Default: the link's
    transfer costs only, no compute costs."""
    import transformers

    from runtime.loader import skeleton

    if max_new_tokens < 1 or batch_size < 1:
        raise RecordError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not prompts:
        raise RecordError("no prompts to record")
    parse_link(link)
    if policy is None:
        policy = "lru"
        if cache_experts is None and cache_per_layer is None and cache_gb is None:  # keep every expert
            spec0 = skeleton(model_name, None)[1]
            if spec0 is None:
                raise RecordError(f"{model_name}: the model has no MoE layer that dispatches through transformers' "
                                  "experts registry: nothing to record")
            cache_per_layer = spec0.num_experts
    size = {k: v for k, v in {"cache_experts": cache_experts, "cache_per_layer": cache_per_layer, "cache_gb": cache_gb}.items()
            if v is not None}
    opened = open_model(model_name, dtype=dtype, device=device, pin_gb=pin_gb, batch=batch_size, prompts=list(prompts),
                        new_tokens=max_new_tokens, **size)
    model, name, dev = opened.model, opened.name, opened.device
    if not find_moe_layers(model):
        raise RecordError(f"{name}: the model has no MoE layer that dispatches through transformers' experts registry: nothing to record")
    if callable(costs):
        costs = costs(model_spec(model, name=name))
    session = OffloadSession(
        model, policy, **size, link=link, name=name, future=future,
        signals=({"probs", "importance", "expert_similarity"} | ({"lookahead"} if lookahead else set())) if signals else set(),
        lookahead_depth=lookahead if signals else 0, costs=costs,
    )
    want = session.signals
    store = opened.memory_report()
    header = Header(
        model=session.spec,
        recording=Recording(
            tool_version=TOOL_VERSION,
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            link=session.link_spec.kind,  # type: ignore[arg-type]
            policy=session.policy.spec,
            cache={"slots": session.cache.capacity, "partition": session.cache.partition},
            prompt_source=prompt_source,
            decoding={"max_new_tokens": max_new_tokens, "do_sample": False, "link": str(session.link_spec),
                      "batch_size": batch_size, "padding": "left"},
            seed=seed,
            start_time=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            host_tier={k.removeprefix("host_tier_"): v for k, v in store.items() if k.startswith("host_tier_")},
        ),
        fields=Fields(probs="probs" in want, lookahead="lookahead" in want and session.lookahead_depth > 0,
                      importance="importance" in want, measured=True, plan=True),
    )
    torch.manual_seed(seed)
    pad = pad_id(model)
    groups = list(batches(prompts, batch_size))
    if warmup:  # one untimed forward, offloaded: first-call costs of the framework are no part of any step
        ids, mask = encode_batch(model, name, groups[0], pad)
        fast = "cuda" if session.link_spec.kind == "cuda" else "emulated:10TB/s"
        with offload(model, "lru", link=fast, name=name, **size), torch.no_grad():
            model(ids.to(dev), attention_mask=mask.to(dev))
    with TraceWriter(out, header) as writer:
        session.install()
        rec = Recorder(writer, session.t0_ns)
        session.on_layer, session.on_step = rec.on_layer, rec.on_step
        if progress:
            from tqdm import tqdm

            rec.bar = tqdm(total=len(prompts) * max_new_tokens, desc=f"record {name}", unit=" tok", file=sys.stderr, disable=None)
        try:
            start = 0
            for group in groups:
                rec.seq_ids = list(range(start, start + len(group)))
                start += len(group)
                ids, mask = encode_batch(model, name, group, pad)
                with torch.no_grad():
                    model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        finally:
            if rec.bar is not None:
                rec.bar.close()
            session.uninstall()
    m = session.metrics
    m.update(opened.memory_report())
    return m


def build_parser() -> argparse.ArgumentParser:
    p = runtime_parser("runtime.record", __doc__)
    add_model_options(p, policy_default=None, batch=True)
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl (a 'prompt' per line), UTF-8")
    p.add_argument("-o", "--out", required=True, type=Path, help="trace to write (.jsonl or .jsonl.gz)")
    p.add_argument("--max-new-tokens", type=positive, default=32, help="tokens generated per prompt")
    p.add_argument("--lookahead", type=int, default=2, help="later MoE layers whose routers guess ahead")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "runtime.record"
    if args.lookahead < 0:
        print(f"{prog}: error: --lookahead must be >= 0", file=sys.stderr)
        return 2
    if cache_sizes(args) > 1:
        print(f"{prog}: error: give one of --cache-experts, --cache-per-layer and --cache-gb", file=sys.stderr)
        return 2
    if args.policy and not cache_sizes(args):
        print(f"{prog}: error: --policy needs a cache size: --cache-experts N, --cache-per-layer K or --cache-gb X", file=sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        check_out(args.out)
        prompts = read_prompts(args.prompts)
        m = record(
            args.model, prompts, args.out, policy=args.policy, cache_experts=args.cache_experts,
            cache_per_layer=args.cache_per_layer, cache_gb=args.cache_gb, link=args.link, max_new_tokens=args.max_new_tokens,
            lookahead=args.lookahead, seed=args.seed, prompt_source=str(args.prompts), device=args.device,
            progress=not args.no_progress, batch_size=args.batch_size, dtype=args.dtype, pin_gb=args.pin_gb,
        )
    except (RecordError, ModelError, OffloadError, LinkError, PolicySpecError, CacheError, MemoryError_) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {m['steps']} steps, {m['layer_calls']} layer calls, hit rate {m['hit_rate']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
