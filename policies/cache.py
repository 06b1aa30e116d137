"""The fast tier (GPU slots) as a policy sees it.

Both engines own one `ExpertCache` and change it only by applying plans (`apply_load`, `touch`) and
by reporting finished transfers (`complete`). The cache keeps the bookkeeping that several policies
share (recency and insertion order per partition, use counts) so that a policy reads it instead of
shadowing it, and the two engines cannot drift apart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Literal

from policies.request import Key

Partition = Literal["global", "per_layer"]


class CacheError(ValueError):
    pass


class PlanError(CacheError):
    """A policy returned a plan that cannot be executed (a policy bug, named as such).

    `rule` is the rule it breaks (a key of `policies.plan.RULES`); once `apply_plan` has seen it,
    `policy` is the policy's spec and the message starts `policy 'SPEC': layer L step S: RULE: `."""

    def __init__(self, rule: str, message: str | None = None, policy: str | None = None, where: str = ""):
        if message is None:  # PlanError("what went wrong"): a rule of the policy's own
            rule, message = "invalid-plan", rule
        self.rule, self.detail, self.policy, self.where = rule, message, policy, where
        head = f"policy {policy!r}: " if policy else ""
        super().__init__(f"{head}{where + ': ' if where else ''}{rule}: {message}")

    def named(self, policy: str | None, where: str) -> PlanError:
        return PlanError(self.rule, self.detail, policy or self.policy, where or self.where)


class ExpertCache:
    """Slots for experts: one slot holds one expert of one variant (`full` or `low`).

    A key that is loading (in flight) already owns its slot. `partition="per_layer"` gives every MoE
    layer its own slots (mixtral-offloading's layout); `"global"` shares all slots across layers.
    """

    def __init__(
        self,
        capacity: int,
        num_layers: int,
        partition: Partition = "global",
        layer_capacity: list[int] | None = None,
    ):
        if partition not in ("global", "per_layer"):
            raise CacheError(f"partition must be 'global' or 'per_layer', got {partition!r}")
        if capacity < 1:
            raise CacheError(f"cache capacity must be at least 1 slot, got {capacity}")
        self.partition: Partition = partition
        self._global = partition == "global"
        self.num_layers = num_layers
        if partition == "global":
            caps = [capacity]
        elif layer_capacity is not None:
            if len(layer_capacity) != num_layers or sum(layer_capacity) != capacity:
                raise CacheError("layer_capacity must list one capacity per layer, summing to capacity")
            caps = list(layer_capacity)
        else:
            if capacity < num_layers:
                raise CacheError(f"a per-layer cache needs at least one slot per layer: {capacity} < {num_layers} layers")
            base, extra = divmod(capacity, num_layers)
            caps = [base + (1 if i < extra else 0) for i in range(num_layers)]
        self.capacity = capacity
        self.part_capacity: list[int] = caps
        self.free: list[int] = list(caps)
        self.resident: dict[Key, str] = {}  # key -> variant, loading keys included
        self.inflight: set[Key] = set()
        self.recency: list[OrderedDict[Key, None]] = [OrderedDict() for _ in caps]  # least recent first
        self.inserted: list[OrderedDict[Key, None]] = [OrderedDict() for _ in caps]  # oldest first
        self.uses: dict[Key, int] = {}  # accesses since the start, resident or not
        self.prefetched_unused: set[Key] = set()

    # -- reading -----------------------------------------------------------------------------------
    def part(self, key: Key) -> int:
        return 0 if self._global else key[0]

    def __contains__(self, key: object) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def is_ready(self, key: Key) -> bool:
        return key in self.resident and key not in self.inflight

    def variant(self, key: Key) -> str | None:
        return self.resident.get(key)

    def least_recent(self, part: int) -> Iterator[Key]:
        """Resident keys of a partition, least recently used first."""
        return iter(self.recency[part])

    def oldest(self, part: int) -> Iterator[Key]:
        """Resident keys of a partition, earliest loaded first."""
        return iter(self.inserted[part])

    def lowest(self, part: int, exclude: set[Key] | frozenset[Key], score: dict[Key, float] | dict[Key, int]) -> Key | None:
        """The partition's key outside `exclude` with the lowest score (missing: 0), ties to the least
        recent: the victim of every frequency-like policy."""
        best: Key | None = None
        best_s = 0.0
        for k in self.recency[part]:
            if k in exclude:
                continue
            v = score.get(k, 0)
            if best is None or v < best_s:
                best, best_s = k, v
        return best

    def min_capacity(self) -> int:
        return min(self.part_capacity)

    # -- changing (engines only, while applying a plan) ---------------------------------------------
    def apply_load(self, key: Key, victim: Key | None, variant: str = "full", prefetch: bool = False) -> bool:
        """Put `key` in a slot, evicting `victim` first. Returns True if the victim was an unused prefetch."""
        resident = self.resident
        if key in resident and victim != key:  # victim == key: a new variant in the same slot
            raise PlanError("load-resident", f"plan loads {key}, which is already resident")
        part = 0 if self._global else key[0]
        wasted = False
        if victim is not None:
            if victim not in resident:
                raise PlanError("evict-absent", f"plan evicts {victim}, which is not resident")
            if (0 if self._global else victim[0]) != part:
                raise PlanError("evict-other-partition", f"plan evicts {victim} to make room for {key} in another partition")
            wasted = self.evict(victim)
        if self.free[part] <= 0:
            raise PlanError("no-free-slot", f"plan loads {key} into a full partition without evicting anything")
        self.free[part] -= 1
        resident[key] = variant
        self.inflight.add(key)
        self.inserted[part][key] = None
        self.recency[part][key] = None
        if prefetch:
            self.prefetched_unused.add(key)
        return wasted

    def evict(self, key: Key) -> bool:
        part = 0 if self._global else key[0]
        del self.resident[key]
        self.inflight.discard(key)
        del self.inserted[part][key]
        del self.recency[part][key]
        self.free[part] += 1
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            return True
        return False

    def complete(self, key: Key) -> None:
        self.inflight.discard(key)

    def touch(self, keys: Iterable[Key]) -> None:
        """Record one access of each key, in the given order (the engines pass a call's access order)."""
        uses, resident, recency, glob = self.uses, self.resident, self.recency, self._global
        for key in keys:
            uses[key] = uses.get(key, 0) + 1
            if key in resident:
                recency[0 if glob else key[0]].move_to_end(key)
        if self.prefetched_unused:
            self.prefetched_unused.difference_update(keys)
