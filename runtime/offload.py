"""Offloaded execution of a Hugging Face MoE model: experts in CPU memory, a slot cache on the device.

Installed through transformers' experts registry (`ALL_EXPERTS_FUNCTIONS` + `set_experts_implementation`),
which every modern MoE class dispatches through; no model class is copied or patched. At every MoE
layer call the session asks the policy for a plan, applies it with `policies.apply_plan` (the same
counting as the simulator), moves the weights over the link, and computes the experts exactly as
transformers' eager path does, so a lossless policy changes no bit of the output on the CPU.

Reading the model (`find_moe_layers`, `model_spec`, `expert_similarity`) lives in `runtime.introspect`,
the two tiers (`ExpertStore`, `SlotPool`) in `runtime.tiers`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from lab.cache import CacheConfig
from policies import (
    CacheError,
    CostModel,
    Counters,
    ExpertCache,
    Future,
    Key,
    LayerPlan,
    LayerRequest,
    Policy,
    apply_plan,
    make_policy,
)
from policies.costs import ComputeCost, variant_bits, variant_bytes
from policies.plan import preload as preload_key
from runtime.introspect import (  # noqa: F401  (re-exported: `from runtime.offload import ...` keeps working)
    _DTYPES,
    MoELayer,
    OffloadError,
    _expert_parts,
    _is_experts,
    expert_similarity,
    find_moe_layers,
    model_spec,
)
from runtime.links import Copy, CudaLink, EmulatedLink, LinkSpec, make_link, parse_link
from runtime.memory import release_freed_memory
from runtime.signals import RouterTap, importance_of, lookahead_of, probs_of
from runtime.tiers import ExpertStore, SlotPool, attach_store, attached_store
from traces.schema import ModelSpec

IMPLEMENTATION = "moe_offload_lab"


def dense_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter that holds memory (offloaded
    experts are meta tensors)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


# -- the session -------------------------------------------------------------------------------------
@dataclass
class StepRecordRT:
    step: int
    phase: str
    start_ns: int
    end_ns: int = 0
    tokens: int = 0  # token rows of the forward (batch x positions)


@dataclass
class LayerEvent:
    """What one layer call did, for the recorder."""

    step: int
    phase: str
    layer: int
    request: LayerRequest
    plan: LayerPlan
    start_ns: int
    end_ns: int
    stall_ns: int
    loads: list[Copy] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # the experts' input, for look-ahead routing


class OffloadSession:
    """One offloaded run. Use `offload(...)`, which installs and uninstalls it."""

    def __init__(
        self,
        model: nn.Module,
        policy: str | Policy,
        *,
        cache_experts: int | None = None,
        cache_per_layer: int | None = None,
        partition: Literal["global", "per_layer"] | None = None,
        cache_gb: float | None = None,
        cache: CacheConfig | None = None,
        link: str | LinkSpec = "emulated:16GB/s",
        costs: CostModel | None = None,
        future: Future | None = None,
        on_layer: Callable[[LayerEvent], None] | None = None,
        on_step: Callable[[StepRecordRT], None] | None = None,
        name: str | None = None,
        signals: set[str] | frozenset[str] = frozenset(),
        lookahead_depth: int = 0,
        pin_bytes: int | None = None,
    ):
        self.model = model
        self.layers = find_moe_layers(model)
        self.spec = model_spec(model, self.layers, name)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        # the cache size means what it means in the simulator: one definition, lab.cache.CacheConfig
        try:
            self.cache_config = cache or CacheConfig(experts=cache_experts, per_layer=cache_per_layer, gb=cache_gb, partition=partition)
            self.cache: ExpertCache = self.cache_config.build(self.spec)
        except ValidationError as exc:
            raise OffloadError(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")) from None
        except CacheError as exc:
            raise OffloadError(str(exc)) from None
        n_layers = self.spec.num_moe_layers
        slots = self.cache.capacity
        total = self.spec.num_experts * n_layers
        if slots > total:
            raise OffloadError(f"cache of {slots} slots is larger than the model's {total} routed experts")
        self.device = dense_device(model)
        self.pin_bytes = pin_bytes
        self._attached = attached_store(model)
        self.link_spec = parse_link(link) if isinstance(link, str) else link
        if self.link_spec.kind == "cuda" and self.device.type != "cuda":
            raise OffloadError("link 'cuda' needs the model on a CUDA device")
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            need = slots * self.spec.expert_bytes
            if need > free + sum(  # the experts still on the device are freed by `install`
                t.numel() * t.element_size()
                for ly in self.layers
                for t in (getattr(ly.experts, p) for p in _expert_parts(ly.experts))
                if t.device.type == "cuda"
            ):
                raise OffloadError(f"a cache of {slots} experts needs {need / 2**30:.2f} GiB; the device has {free / 2**30:.2f} GiB free")
        if self.policy.wants_future() and future is None:
            raise OffloadError(
                f"policy {self.policy.name!r} is an oracle: the runtime runs it only with the trace of the very run it repeats"
            )
        # bytes per variant from the one function the simulator uses too, so bytes_h2d agree
        vb = variant_bytes(self.spec, self.policy)
        if set(vb) - {"full", "low"}:
            raise OffloadError(f"the runtime moves experts as 'full' or 'low' copies; policy {self.policy.name!r} wants {sorted(vb)}")
        self.low_bits: int | None = variant_bits(self.spec, self.policy).get("low")
        self.costs = costs or _link_costs(self.spec, self.link_spec)
        if self.costs.variant_bytes != vb:
            self.costs = dataclasses.replace(self.costs, variant_bytes=vb)
        self.future = future
        self.on_layer = on_layer
        # what the requests carry beyond the routing: what the policy reads, and what the caller asks
        self.signals = set(self.policy.uses) | set(signals)
        if "expert_similarity" in self.signals:
            # a header item: computed once, here (before `install` empties the experts modules), into the
            # one spec that both the policy (`reset`) and the recorder's header get
            self.spec = ModelSpec.model_validate({**self.spec.model_dump(), "expert_similarity": expert_similarity(self.layers, store=self._attached)})
        self.lookahead_depth = max(lookahead_depth, getattr(self.policy, "lookahead_depth", 0) or 0)
        if "lookahead" in self.signals and self.lookahead_depth < 1:
            self.lookahead_depth = 1
        self.tap: RouterTap | None = None
        self.on_step = on_step
        self.counters = Counters()
        self.steps: list[StepRecordRT] = []
        self.stall_ns = 0
        self._pending: dict[Key, Copy] = {}
        self.expert_times: list[tuple[int, int]] | None = None  # (token rows, ns) per GPU expert, when calibrating
        self._lock = threading.Lock()
        self._installed = False

    # -- install / uninstall ---------------------------------------------------------------------
    def install(self) -> None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
            ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _offloaded_experts_forward)
        pin = self.device.type == "cuda"
        if self._attached is not None:  # the loader's slow tier: the experts live there for good
            self.store = self._attached
            if self.low_bits:
                self.store.ensure_low(self.low_bits, bool(self.layers[0].experts.is_transposed), pin)
        else:  # a whole model: its experts move to a slow tier of this session's (given back by `uninstall`)
            self.store = ExpertStore(self.layers, pin=pin, low_bits=self.low_bits, pin_bytes=self.pin_bytes, release=True)
        self.pool = SlotPool(self.cache.capacity, self.store, self.device)
        self.link: EmulatedLink | CudaLink = make_link(self.link_spec, self.device)
        for ly in self.layers:  # the experts' 3D weights are meta tensors now: the slots are the device's expert memory
            ly.experts._moe_offload = (self, ly.index)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._prev_impl = getattr(self.model.config, "_experts_implementation", None)
        self.model.set_experts_implementation(IMPLEMENTATION)
        self._hooks = [
            self.model.register_forward_pre_hook(self._step_begin, with_kwargs=True),
            self.model.register_forward_hook(self._step_end, with_kwargs=True),
        ]
        if self.signals & {"probs", "importance"}:
            self.tap = RouterTap([ly.router for ly in self.layers])
        self.routers = [ly.router for ly in self.layers]
        self.policy.reset(self.spec, self.cache, self.costs, self.future)
        self.t0_ns = time.perf_counter_ns()
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        self.link.close()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        for h in self._hooks:
            h.remove()
        for ly in self.layers:
            del ly.experts._moe_offload
        del self.pool
        if self._attached is None:
            # this session's slow tier: the 3D weights go back where they came from, layer by layer
            self.store.restore(self.layers)
            if self._prev_impl is not None:
                self.model.set_experts_implementation(self._prev_impl)
        # else the model stays offloaded (the loader's slow tier): outside a session its experts
        # implementation says so in one line instead of computing on meta tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.t1_ns = time.perf_counter_ns()
        self._installed = False

    # -- steps --------------------------------------------------------------------------------------
    def _step_begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        seq = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
        rows = int(ids.shape[0]) * seq if ids is not None and ids.dim() >= 2 else 1
        self.steps.append(StepRecordRT(len(self.steps), "prefill" if seq > 1 else "decode", time.perf_counter_ns(), tokens=rows))

    def _step_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # step latency is measured on the host clock
        self.steps[-1].end_ns = time.perf_counter_ns()
        self.policy.observe(self.steps[-1].step)
        if self.on_step is not None:
            self.on_step(self.steps[-1])

    # -- one MoE layer call -------------------------------------------------------------------------
    def layer_call(self, experts: nn.Module, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter_ns()
        step = self.steps[-1] if self.steps else StepRecordRT(0, "prefill", t0)
        if not self.steps:
            self.steps.append(step)
        # copies that have landed since the last call: the in-flight split of the counters
        for key, cp in list(self._pending.items()):
            if self.link.is_done(cp):
                del self._pending[key]
                self.cache.complete(key)
        idx_np = top_k_index.detach().cpu().numpy().astype(np.int64)
        w_np = top_k_weights.detach().to(torch.float32).cpu().numpy().astype(np.float64)
        probs = importance = look = None
        if self.tap is not None:
            logits = self.tap.logits.pop(layer, None)
            if logits is not None and logits.shape[0] == hidden.shape[0]:
                p = probs_of(logits, self.spec.arch)
                probs = p.cpu().numpy()
                importance = importance_of(p).cpu().numpy() if "importance" in self.signals else None
        if self.lookahead_depth and "lookahead" in self.signals:
            look = {k: v.cpu().numpy() for k, v in lookahead_of(self.routers, layer, hidden, self.lookahead_depth).items()}
        req = LayerRequest(step.step, step.phase, layer, idx_np, w_np, probs, look, importance)  # type: ignore[arg-type]
        plan = self.policy.plan(req, self.cache)
        waits = {k: self._pending[k] for k in plan.execute if k in self._pending}
        apply_plan(self.cache, req, plan, self.counters, self.costs.variant_bytes, self.policy)
        release: dict[Key, Any] = {}
        # slots of the call's experts now: a later copy of this call may take a slot over (reuse)
        slot_for = {k: self.pool.slot_of[k] for k in plan.execute if k in self.pool.slot_of}
        copies = self._issue(plan, release, slot_for)
        for cp in copies:
            if cp.urgent:
                waits[cp.key] = cp

        # the executed assignment: as routed, unless the plan changed it
        if plan.topk is not None:
            index_np = np.asarray(plan.topk, dtype=np.int64)
            weights = torch.as_tensor(plan.weights, device=hidden.device, dtype=top_k_weights.dtype)
        else:
            index_np, weights = idx_np, top_k_weights
        rows = self._rows_of(index_np, [k[1] for k in (*plan.order, *plan.cpu)], hidden.device)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        stall = 0
        cuda = isinstance(self.link, CudaLink)
        for key in plan.order:
            e = key[1]
            cp = waits.get(key)
            if cp is not None:
                w0 = time.perf_counter_ns()
                self.link.wait(cp)
                stall += time.perf_counter_ns() - w0
            slot = slot_for[key]
            top_k_pos, token_idx = rows[e]
            if self.expert_times is not None:  # calibration: each expert's time on the host clock
                # (no device sync: a run has none here, so the device's share lands in the next sync)
                x0 = time.perf_counter_ns()
                out = _expert_math(experts, self.pool.views[slot], hidden[token_idx])
                self.expert_times.append((int(token_idx.numel()), time.perf_counter_ns() - x0))
            else:
                out = _expert_math(experts, self.pool.views[slot], hidden[token_idx])
            outputs[e] = (token_idx, out * weights[token_idx, top_k_pos, None])
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                self.pool.last_reader[slot] = ev
                for cp in self._deferred.pop(key, []):  # copies into this slot may go now
                    cp.wait.append(ev)
                    self._submit(cp)
            elif key in release:
                release[key].set()
        for key in plan.cpu:
            e = key[1]
            top_k_pos, token_idx = rows[e]
            views = self.store.views(self.store.buffers[key])
            out = _expert_math(experts, views, hidden[token_idx].to("cpu")).to(hidden.device)
            outputs[e] = (token_idx, out * weights[token_idx, top_k_pos, None])
        if not cuda:
            for cp in copies:  # urgent copies all landed (we waited); mark them complete now
                if cp.urgent and self.link.is_done(cp):
                    self._pending.pop(cp.key, None)
                    self.cache.complete(cp.key)
        final = torch.zeros_like(hidden)
        for e in sorted(outputs):  # transformers' eager path adds the experts in ascending id order
            token_idx, out = outputs[e]
            final.index_add_(0, token_idx, out.to(final.dtype))
        self.stall_ns += stall
        if self.on_layer is not None:
            self.on_layer(LayerEvent(step.step, step.phase, layer, req, plan, t0, time.perf_counter_ns(), stall, copies, hidden))
        return final

    @staticmethod
    def _rows_of(index: np.ndarray, experts: list[int], device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(top-k positions, token rows) routed to each expert, in the order transformers' eager path
        takes them (by position, then token), found on the host from the routing the plan already
        read, and sent to the device in one copy: no device sync per expert, so on a GPU the host
        issues a layer's expert kernels while its copies are still in flight."""
        found = {e: np.nonzero(index.T == e) for e in experts}
        flat = np.concatenate([np.concatenate(found[e]) for e in experts]) if experts else np.zeros(0, np.int64)
        on_dev = torch.from_numpy(flat.astype(np.int64)).to(device, non_blocking=True)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        at = 0
        for e in experts:
            n = len(found[e][0])
            out[e] = (on_dev[at:at + n], on_dev[at + n:at + 2 * n])
            at += 2 * n
        return out

    def _issue(self, plan: LayerPlan, release: dict[Key, Any], slot_for: dict[Key, int]) -> list[Copy]:
        """Hand the plan's copies to the link. A copy into a slot first waits for the slot's previous
        occupant: its own copy, and its compute if this call uses it (emulated: an event the compute
        thread sets; CUDA: the copy is submitted once the compute stream has the victim's kernels, and
        waits on the event recorded after them), and on CUDA the last kernel that read the slot."""
        cuda = isinstance(self.link, CudaLink)
        need = set(plan.execute)
        copies: list[Copy] = []
        self._deferred: dict[Key, list[Copy]] = {}
        self._followers: dict[Copy, list[Copy]] = {}
        for urgent, group in ((True, plan.loads), (False, plan.prefetch)):
            for ld in group:
                wait: list[Any] = []
                chain: Copy | None = None
                if ld.victim is not None:
                    prev = self._pending.pop(ld.victim, None)
                    if prev is not None:  # the victim's own copy must land before its slot is overwritten
                        if prev.done is None:  # CUDA: that copy itself waits for a compute of this call
                            wait.append(prev)  # the link takes its event once it is submitted
                            chain = prev
                        else:
                            wait.append(prev.done)
                slot = self.pool.assign(ld.key, ld.victim)
                slot_for.setdefault(ld.key, slot)
                if cuda and slot in self.pool.last_reader:
                    wait.append(self.pool.last_reader[slot])
                self.pool.variant[slot] = ld.variant
                if ld.variant == "low":  # the quantised bytes cross the link, then become the slot's weights
                    assert self.store.quantizer is not None and self.pool.stage is not None
                    stage = self.pool.stage[slot]
                    cp = Copy(ld.key, self.store.low[ld.key], stage, urgent, wait,
                              post=partial(self.store.quantizer.dequantize, stage, self.pool.views[slot]))
                else:
                    cp = Copy(ld.key, self.store.buffers[ld.key], self.pool.buf[slot], urgent, wait)
                self._pending[ld.key] = cp
                copies.append(cp)
                # the slot is reused inside this call (a new variant of the same expert is not: it runs after its copy)
                if ld.victim is not None and ld.victim != ld.key and ld.victim in need:
                    if cuda:  # submitted after the victim's compute, which comes after the victim's copy
                        self._deferred.setdefault(ld.victim, []).append(cp)
                        continue
                    release[ld.victim] = threading.Event()
                    wait.append(release[ld.victim])
                if chain is not None:  # submitted right after the copy it waits for
                    self._followers.setdefault(chain, []).append(cp)
                    continue
                self.link.submit(cp)
        return copies

    def _submit(self, cp: Copy) -> None:
        """Submit a deferred copy, then the copies chained behind it (CUDA)."""
        self.link.submit(cp)
        for nxt in self._followers.pop(cp, []):
            self._submit(nxt)

    def preload(self, keys: list[Key] | None = None) -> int:
        """Fill free slots with experts before a run (a warm start for benchmarks and measurements):
        copied at once, resident and complete; neither the counters nor the policy count it.
        Default: every expert, layer by layer, as long as slots are free. Returns how many."""
        if not self._installed:
            raise OffloadError("preload() needs an installed session (inside `with offload(...)`)")
        keys = keys if keys is not None else [(ly.index, e) for ly in self.layers for e in range(int(ly.experts.num_experts))]
        n = 0
        for key in keys:
            if key in self.cache or self.cache.free[self.cache.part(key)] <= 0:
                continue
            preload_key(self.cache, key, self.policy)  # resident, complete, and told to the policy
            slot = self.pool.assign(key, None)
            self.pool.buf[slot].copy_(self.store.buffers[key])
            self.pool.variant[slot] = "full"
            n += 1
        return n

    # -- results ------------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics of docs/design.md section 5, counted as the simulator counts them (times measured)."""
        steps = [s for s in self.steps if s.end_ns]
        m = self.counters.metrics([(s.phase, s.start_ns / 1e9, s.end_ns / 1e9) for s in steps])
        end = getattr(self, "t1_ns", None) or time.perf_counter_ns()
        total = (end - self.t0_ns) / 1e9
        m.update(
            {
                "stall_s": self.stall_ns / 1e9,
                "total_s": total,
                "link_busy_frac": (self.link.busy_ns / 1e9 / total) if total > 0 and self.link.kind == "emulated" else None,
            }
        )
        return m


def _expert_math(experts: nn.Module, w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert on its token rows, the same operations as transformers' eager experts loop."""
    if experts.is_transposed:
        gate_up = x @ w[0]
        if experts.has_bias:
            gate_up = gate_up + w[2]
        h = experts._apply_gate(gate_up) if experts.has_gate else experts.act_fn(gate_up)
        out = h @ w[1]
        if experts.has_bias:
            out = out + w[3]
        return out
    if experts.has_gate:
        gate, up = nn.functional.linear(x, w[0], w[2] if experts.has_bias else None).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    else:
        h = experts.act_fn(nn.functional.linear(x, w[0], w[2] if experts.has_bias else None))
    return nn.functional.linear(h, w[1], w[3] if experts.has_bias else None)


def offload_experts(model: nn.Module, device: str | torch.device, *, pin_bytes: int | None = None) -> ExpertStore | None:
    """Move a model's routed experts into a slow tier attached to it for good, and the rest of the
    model (its dense part) to `device`. The experts are copied layer by layer from where they are
    (the host, as loaded) into the store's arena, each layer's parameters replaced by meta tensors
    right after, so they never exist twice beyond one layer and never touch the device. From then
    on every `offload()` session of the model uses this store, and the model runs only inside one.
    Returns the store (None for a model without MoE layers: it just moves to `device`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    dev = torch.device(device)
    layers = find_moe_layers(model)
    store = None
    if layers and attached_store(model) is None:
        store = ExpertStore(layers, pin=dev.type == "cuda", pin_bytes=pin_bytes, release=True)
        attach_store(model, store)
        if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
            ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _offloaded_experts_forward)
        model.set_experts_implementation(IMPLEMENTATION)
    model._apply(lambda t: t if t.is_meta else t.to(dev))
    release_freed_memory()
    return store


def _offloaded_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The function registered in transformers' experts registry."""
    bound = getattr(self, "_moe_offload", None)
    if bound is None:
        raise OffloadError("this model's experts are offloaded to the host tier: run it inside `with offload(model, ...)`")
    session, layer = bound
    return session.layer_call(self, layer, hidden_states, top_k_index, top_k_weights)


def _link_costs(spec: ModelSpec, link: LinkSpec) -> CostModel:
    """A cost model with what the runtime knows without calibration: the link."""
    bw = link.bandwidth_Bps if link.bandwidth_Bps else 25e9
    return CostModel(link.latency_s, bw, {"full": spec.expert_bytes}, ComputeCost(), ComputeCost(), ComputeCost())


@contextmanager
def offload(model: nn.Module, policy: str | Policy = "lru", **kwargs: Any) -> Iterator[OffloadSession]:
    """Run `model` with its experts offloaded under `policy` inside the block:

        with offload(model, policy="lru", cache_experts=16, link="emulated:16GB/s") as session:
            out = model.generate(ids, max_new_tokens=32)
        session.metrics
    """
    session = OffloadSession(model, policy, **kwargs)
    session.install()
    try:
        yield session
    finally:
        session.uninstall()
