"""Record the trace of an offloaded run (DESIGN section 3): every routing decision, with the router's
probabilities, look-ahead guesses, token importance, the plan that ran and measured timings, and in
the header the cosine similarity of the experts' weights.

    python -m runtime.record --model M --prompts FILE [--max-new-tokens N] [--policy SPEC
        (--cache-experts N | --cache-per-layer K)] [--link L] -o traces/x.jsonl.gz

Without --policy the run keeps every expert (LRU with a cache of all of them): the routing is the
model's own, and the trace says which policy and cache produced it. The trace is written through a
temporary file: an interrupted recording leaves the previous file, or none.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policies import CostModel, Future, PolicySpecError
from runtime.links import LinkError
from runtime.models import ModelError, load_model
from runtime.offload import LayerEvent, OffloadError, OffloadSession, StepRecordRT, model_spec
from traces.cli import OneLineParser
from traces.io import TraceWriter
from traces.schema import ExpertLoad, Fields, Header, LayerRecord, Measured, ModelSpec, Recording, StepRecord

TOOL_VERSION = "0.1.0"


class RecordError(ValueError):
    pass


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a .txt file, or the `prompt` field of each line of a .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"{p}: no such prompts file")
    prompts: list[str] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
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


class Recorder:
    """Turns a session's layer and step events into trace records, as they happen. The session
    computes the probabilities, look-ahead and importance (it is asked for them), so a policy that
    reads them and the trace see the same numbers."""

    def __init__(self, writer: TraceWriter, t0_ns: int):
        self.writer = writer
        self.t0 = t0_ns
        self.seq_id = 0
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
            StepRecord(step=st.step, phase=st.phase, seq_ids=[self.seq_id], latency_ns=max(0, st.end_ns - st.start_ns))  # type: ignore[arg-type]
        )


def record(
    model_name: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    policy: str | None = None,
    cache_experts: int | None = None,
    cache_per_layer: int | None = None,
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
) -> dict[str, Any]:
    """Run the prompts one after another (each a sequence of its own), write the trace, return the
    session's metrics. `signals=False` records only what the policy itself reads (no probabilities,
    look-ahead, importance or weight similarity beyond it): the run then costs what it costs without a
    recorder, which is what validation measures.

    `costs` is the cost model the policy gets at `reset` (policies that weigh costs, such as
    `fiddler`, need the one the simulator will use): a `CostModel`, or a function of the run's
    `ModelSpec` that returns one (`runtime.validate` passes the profile's `cost_model`). Default: the link's
    transfer costs only, no compute costs."""
    import transformers

    model, name = load_model(model_name, device=device)
    if policy is None:
        policy = "lru"
        if cache_experts is None and cache_per_layer is None:
            cache_per_layer = int(next(m for m in model.modules() if hasattr(m, "has_gate")).num_experts)
    session_kw = {"cache_experts": cache_experts, "cache_per_layer": cache_per_layer, "link": link}
    if callable(costs):
        costs = costs(model_spec(model, name=name))
    session = OffloadSession(
        model, policy, **{k: v for k, v in session_kw.items() if v is not None}, name=name, future=future,
        signals=({"probs", "importance", "expert_similarity"} | ({"lookahead"} if lookahead else set())) if signals else set(),
        lookahead_depth=lookahead if signals else 0, costs=costs,
    )
    want = session.signals
    header = Header(
        model=session.spec,
        recording=Recording(
            tool_version=TOOL_VERSION,
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            device=torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
            link=session.link_spec.kind,  # type: ignore[arg-type]
            policy=session.policy.spec,
            cache={"slots": session.cache.capacity, "partition": session.cache.partition},
            prompt_source=prompt_source,
            decoding={"max_new_tokens": max_new_tokens, "do_sample": False, "link": str(session.link_spec)},
            seed=seed,
            start_time=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        ),
        fields=Fields(probs="probs" in want, lookahead="lookahead" in want and session.lookahead_depth > 0,
                      importance="importance" in want, measured=True, plan=True),
    )
    torch.manual_seed(seed)
    if warmup:  # one untimed forward: first-call costs of the framework are no part of any step
        with torch.no_grad():
            model(encode(model, name, prompts[0]).to(device))
    with TraceWriter(out, header) as writer:
        session.install()
        rec = Recorder(writer, session.t0_ns)
        session.on_layer, session.on_step = rec.on_layer, rec.on_step
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts) * max_new_tokens, desc=f"record {name}", unit=" tok", file=sys.stderr, disable=None)
        try:
            for i, prompt in enumerate(prompts):
                rec.seq_id = i
                ids = encode(model, name, prompt).to(device)
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
                if bar is not None:
                    bar.update(max_new_tokens)
        finally:
            if bar is not None:
                bar.close()
            session.uninstall()
    return session.metrics


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m runtime.record", description="Record the routing trace of an offloaded run.")
    p.add_argument("--model", required=True, help="local checkpoint directory or a tiny model (tiny-mixtral, ...)")
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl (a 'prompt' per line)")
    p.add_argument("-o", "--out", required=True, type=Path, help="trace to write (.jsonl or .jsonl.gz)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--policy", help="policy spec of the run (default: keep every expert)")
    p.add_argument("--cache-experts", type=int, metavar="N")
    p.add_argument("--cache-per-layer", type=int, metavar="K")
    p.add_argument("--link", default="emulated:16GB/s", help="cuda | emulated:<bandwidth>[,<latency>]")
    p.add_argument("--lookahead", type=int, default=2, help="later MoE layers whose routers guess ahead (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "runtime.record"
    if args.max_new_tokens < 1 or args.lookahead < 0:
        print(f"{prog}: error: --max-new-tokens must be >= 1 and --lookahead >= 0", file=sys.stderr)
        return 2
    if args.cache_experts is not None and args.cache_per_layer is not None:
        print(f"{prog}: error: give one of --cache-experts and --cache-per-layer", file=sys.stderr)
        return 2
    if args.policy and args.cache_experts is None and args.cache_per_layer is None:
        print(f"{prog}: error: --policy needs a cache size: --cache-experts N or --cache-per-layer K", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args.prompts)
        m = record(
            args.model, prompts, args.out, policy=args.policy, cache_experts=args.cache_experts,
            cache_per_layer=args.cache_per_layer, link=args.link, max_new_tokens=args.max_new_tokens,
            lookahead=args.lookahead, seed=args.seed, prompt_source=str(args.prompts), device=args.device,
            progress=not args.no_progress,
        )
    except (RecordError, ModelError, OffloadError, LinkError, PolicySpecError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {m['steps']} steps, {m['layer_calls']} layer calls, hit rate {m['hit_rate']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
