"""Fiddler (Kamahori et al., arXiv 2402.07033): run a missing expert on the CPU when that is faster
than copying its weights to the GPU."""

from __future__ import annotations

from policies.base import Modifier, PolicySpecError, register
from policies.cache import ExpertCache
from policies.plan import LayerPlan, Load
from policies.request import Key, LayerRequest


@register("fiddler")
class Fiddler(Modifier):
    """A missing expert runs on the CPU (from host memory, no copy) when the cost model says
    `cpu_expert_s(n) < transfer_s(variant) + gpu_expert_s(n)` for its `n` token rows; otherwise it is
    loaded (urgent) as the wrapped policy planned. `lru+fiddler`; `fiddler` alone wraps `lru`.

    Fiddler (arXiv 2402.07033) keeps the weights of missing experts in CPU memory and moves the
    activations instead: for a decode token a CPU expert takes less time than the PCIe copy of its
    weights, while a prefill batch is better served by copying and running on the GPU; the cost model
    decides per expert and call. Experts run on the CPU are not GPU accesses (no hit, no miss, not
    loaded, so the cache does not change for them) and are counted in `cpu_experts`. Hits stay on the
    GPU. A load of the wrapped plan whose slot a later load of the same call reused (a call streaming
    more experts than the partition holds) hands its slot to that load when it moves to the CPU.

    The decision needs the deterministic `CostModel` at `reset` (from the hardware profile); without
    CPU and GPU expert costs the policy refuses to start. The simulator always has one; in the runtime
    it must be the same cost model the simulator uses: `runtime.validate` passes the profile's, and
    in Python `OffloadSession(costs=profile.cost_model(spec))` or `runtime.record.record(costs=...)`.
    (`python -m runtime.record` and `runtime.run` have no profile: the runtime may not import `sim`.)
    Lossless: the CPU computes the same expert.
    """

    def reset(self, model, cache, costs, future=None):  # type: ignore[no-untyped-def]
        super().reset(model, cache, costs, future)
        if costs is None or (costs.cpu_expert_s(1) <= 0.0 and costs.gpu_expert_s(1) <= 0.0):
            raise PolicySpecError(
                "fiddler needs a cost model with CPU and GPU expert costs from a hardware profile "
                "(sim.replay --hardware, runtime.validate --profile, or OffloadSession(costs=profile.cost_model(spec)))"
            )
        self._cpu: dict[tuple[int, str], bool] = {}
        self.cpu_calls = 0  # experts it sent to the CPU

    def cpu_wins(self, tokens: int, variant: str = "full") -> bool:
        """Whether running `tokens` rows on the CPU beats copying the expert and running it on the GPU."""
        got = self._cpu.get((tokens, variant))
        if got is None:
            c = self.costs
            assert c is not None
            got = self._cpu[(tokens, variant)] = c.cpu_expert_s(tokens) < c.transfer_s(variant) + c.gpu_expert_s(tokens)
        return got

    def plan(self, req: LayerRequest, cache: ExpertCache) -> LayerPlan:
        plan = self.base.plan(req, cache)
        if not plan.loads:
            return plan
        counts = plan.tokens_per_expert(req)
        # a load in place of the key itself (another variant of a resident expert) is not a miss of it
        move = {ld.key for ld in plan.loads if ld.victim != ld.key and self.cpu_wins(counts[ld.key[1]], ld.variant)}
        if not move:
            return plan
        loads: list[Load] = []
        freed: dict[Key, Key | None] = {}  # a moved key -> the slot (victim, None: a free one) it would have taken
        for ld in plan.loads:
            victim = ld.victim
            if victim in freed:  # the slot went to a key that now runs on the CPU: take that key's slot
                victim = freed.pop(victim)  # type: ignore[arg-type]
            if ld.key in move:
                freed[ld.key] = victim
            else:
                loads.append(ld if victim is ld.victim else Load(ld.key, victim, ld.variant))
        plan.loads = loads
        plan.cpu = [*plan.cpu, *(k for k in plan.execute if k in move)]
        plan.execute = [k for k in plan.execute if k not in move]
        plan.order = [k for k in plan.order if k not in move]
        self.cpu_calls += len(move)
        return plan
