"""Replay a routing trace against expert-cache policies under a byte budget (numpy + stdlib only).

Every policy sees the runtime's demand accesses (`trace.accesses`): per step, per layer, the
distinct selected experts in ascending order, served a layer at a time as `ExpertCache.get_many`
serves them: the resident ones are hits, marked used first; then each miss, in order, is loaded,
evicting by the policy's rule until it fits (the layer's hits marked used again in their turn).

Policies:
  lru      the runtime's `ExpertCache` today (same hits, misses and evictions).
  lfu      evict the least frequently used expert; frequency counts every demand access so far,
           also those before an eviction (MoE expert popularity is fairly stable, and in-cache
           counts would evict each newcomer first); ties go to the least recently used.
  pinned   a hot set chosen from a usage profile is loaded up front and never evicted; LRU
           runs in the rest of the budget (see `hot_set`), by layer under a budget smaller than
           a token's experts (see `Pinned`). The runtime's default.
  runtime  the runtime with `--prefetch`: pinned + LRU + prefetch of each layer's `predicted`
           experts before the layer runs (see `Runtime`). Needs `LayerRouting.predicted` in the
           trace; without it, = pinned. It hits more than `pinned`, but hits are not time: its
           wrong predictions are loads too (why prefetch is off by default: `load_model`).
  belady   Belady's MIN: evict the resident expert whose next use is furthest away. Optimal for
           demand fetching when all experts have one size; with mixed sizes it is only a good
           heuristic (the optimum is NP-hard), and the result says `"exact": False`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping

from moetvm.budget import BudgetError, parse_budget
from .cache import LayerUse, hot_set_bytes
from .trace import TraceError, Key, RoutingTrace, accesses

POLICIES = ("lru", "lfu", "pinned", "runtime", "belady")


class LRU:
    """A simulated expert cache: the resident set, its bytes and the counters every policy reports.

    Evictable experts live in `resident`, least recently used first; pinned ones are held apart
    and never evicted. Subclasses change `victim` (and `touch`, for their bookkeeping).
    """

    def __init__(self, budget: int, sizes: Mapping[Key, int]):
        self.budget, self.sizes = budget, sizes
        self.resident: OrderedDict[Key, None] = OrderedDict()
        self.pinned: set[Key] = set()
        self.prefetched: set[Key] = set()  # prefetched, not yet demanded (Runtime only)
        self.used = self.max_used = 0
        self.hits = self.misses = self.evictions = self.loads = self.bytes_loaded = 0
        self.useful_prefetches = 0

    def visit(self, keys: list[Key], pos: int) -> None:
        """One layer's demand accesses, numbers `pos`, `pos` + 1, ... of the sequence."""
        missing = set()
        for i, key in enumerate(keys):
            if key in self.pinned or key in self.resident:
                self.hits += 1
                if key in self.resident:
                    self.resident.move_to_end(key)
                if key in self.prefetched:
                    self.useful_prefetches += 1
                    self.prefetched.discard(key)
                self.touch(key, pos + i)
            else:
                missing.add(key)
        for i, key in enumerate(keys):
            if key in missing:
                self.misses += 1
                while self.used + self.sizes[key] > self.budget:
                    self._evict(self.victim())
                self._load(key)
                self.touch(key, pos + i)
            elif key in self.resident:
                self.resident.move_to_end(key)

    def access(self, key: Key, pos: int) -> bool:
        """Demand access number `pos` of the sequence, alone; True on a hit."""
        hit = key in self.pinned or key in self.resident
        self.visit([key], pos)
        return hit

    def prefetch(self, layer: int, previous: int | None, experts: list[int]) -> None:
        """Called before a layer with its predicted experts; demand-only policies ignore it."""

    def victim(self) -> Key:
        return next(iter(self.resident))

    def touch(self, key: Key, pos: int) -> None:
        pass

    def _load(self, key: Key) -> None:
        self.used += self.sizes[key]
        # The property the tests lean on: no policy ever holds more than the budget.
        assert self.used <= self.budget, f"{type(self).__name__}: {self.used} bytes resident > budget {self.budget}"
        self.max_used = max(self.max_used, self.used)
        self.loads += 1
        self.bytes_loaded += self.sizes[key]
        self.resident[key] = None

    def _evict(self, key: Key) -> None:
        del self.resident[key]
        self.prefetched.discard(key)
        self.used -= self.sizes[key]
        self.evictions += 1

    def result(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "accesses": total,
                "hit_rate": self.hits / total if total else 0.0, "loads": self.loads,
                "bytes_loaded": self.bytes_loaded, "evictions": self.evictions,
                "max_resident_bytes": self.max_used, "budget_bytes": self.budget}


class LFU(LRU):
    def __init__(self, budget, sizes):
        super().__init__(budget, sizes)
        self.count: Counter[Key] = Counter()

    def touch(self, key, pos):
        self.count[key] += 1

    def victim(self):
        # min() returns the first minimum and `resident` runs least recent first: ties -> LRU.
        return min(self.resident, key=self.count.__getitem__)


def hot_set(counts: Mapping[Key, int], sizes: Mapping[Key, int], budget: int, limit: int) -> set[Key]:
    """The experts to pin: most used first (ties by key), while their bytes stay within `limit`
    and the unpinned rest of the budget still holds the largest expert. Experts the profile
    never saw are not pinned."""
    largest = max(sizes.values(), default=0)
    pinned, used = set(), 0
    for key in sorted(counts, key=lambda k: (-counts[k], k)):
        n = sizes.get(key)
        if counts[key] > 0 and n is not None and used + n <= limit and budget - used - n >= largest:
            pinned.add(key)
            used += n
    return pinned


class Pinned(LRU):
    """LRU with a hot set loaded at start (counted in loads and bytes_loaded, not as misses:
    the runtime would load it with the model). Under a budget smaller than a token's experts
    (`token_bytes`; `layers` in the order they run) it evicts as the runtime does there
    (`cache.LayerUse`): experts their layer's last run did not use first, least recently used
    first; then by when their layer runs next, furthest first."""

    def __init__(self, budget, sizes, pinned: set[Key], token_bytes: int = 0, layers: Iterable[int] = ()):
        super().__init__(budget, sizes)
        for key in sorted(pinned):
            self._load(key)
            del self.resident[key]  # held apart from the LRU order, never a victim
        self.pinned = set(pinned)
        self.layer_use = LayerUse(layers) if budget < token_bytes else None
        # The layer last visited (a prefetch comes before its own layer's visit): the first at start.
        self.current = next(iter(self.layer_use.rank), None) if self.layer_use is not None else None

    def visit(self, keys: list[Key], pos: int) -> None:
        if self.layer_use is not None and keys:
            self.current = keys[0][0]
            self.layer_use.note(self.current, keys)
        super().visit(keys, pos)

    def victim(self):
        return next(self.eviction_order()) if self.layer_use is not None else super().victim()

    def eviction_order(self) -> Iterator[Key]:
        """Resident (unpinned) experts, first evicted first."""
        if self.layer_use is None:
            return iter(self.resident)  # least recently used first
        return self.layer_use.order(self.resident, self.current)

    def result(self):
        return {**super().result(), "pinned": len(self.pinned),
                "pinned_bytes": sum(self.sizes[k] for k in self.pinned)}


class Runtime(Pinned):
    """The runtime's policy with `--prefetch`: pinned hot set + LRU + prefetch of predicted experts.

    Before layer L runs, each predicted expert of L (ascending) that is not resident is loaded if
    room can be made by evicting, least recently used first, experts that are neither pinned nor
    of layer L (about to run) nor of the layer before L in the same step (in a pipelined runtime
    the prefetch overlaps that layer's compute, so its weights are in use). If that cannot make
    room the prefetch is skipped; it never evicts a protected expert. A prefetched expert goes in
    as the least recently used (first out, until a demand uses it: a wrong prediction then costs
    the last wrong one, not an expert in use). A predicted expert already resident is moved to
    most recently used so the layer's own misses do not evict it first. A prefetched expert's
    first demand access is a hit and a useful prefetch. Under a budget smaller than a token's
    experts, "least recently used first" is `Pinned.eviction_order`, as for the demand.
    """

    def __init__(self, budget, sizes, pinned, token_bytes: int = 0, layers: Iterable[int] = ()):
        super().__init__(budget, sizes, pinned, token_bytes, layers)
        self.prefetch_loads = self.prefetch_bytes = self.prefetch_skipped = 0

    def prefetch(self, layer, previous, experts):
        protected = {layer, previous}
        for expert in experts:
            key = (layer, expert)
            if key in self.pinned:
                continue
            if key in self.resident:
                self.resident.move_to_end(key)
                continue
            need, victims = self.used + self.sizes[key] - self.budget, []
            for k in self.eviction_order():
                if need <= 0:
                    break
                if k[0] not in protected:
                    victims.append(k)
                    need -= self.sizes[k]
            if need > 0:
                self.prefetch_skipped += 1
                continue
            for k in victims:
                self._evict(k)
            self._load(key)
            self.resident.move_to_end(key, last=False)
            self.prefetched.add(key)
            self.prefetch_loads += 1
            self.prefetch_bytes += self.sizes[key]

    def result(self):
        r = super().result()
        needed = self.useful_prefetches + self.misses  # loads demand needed: done early + late
        return {**r, "prefetch_loads": self.prefetch_loads, "prefetch_bytes": self.prefetch_bytes,
                "prefetch_skipped": self.prefetch_skipped, "useful_prefetches": self.useful_prefetches,
                "prefetch_precision": self.useful_prefetches / self.prefetch_loads if self.prefetch_loads else 0.0,
                "prefetch_recall": self.useful_prefetches / needed if needed else 0.0}


class Belady(LRU):
    """MIN: on a miss with a full cache, evict the resident expert used again furthest in the
    future (never again counts as infinitely far). Exactly optimal only with equal sizes."""

    def __init__(self, budget, sizes, sequence: list[Key]):
        super().__init__(budget, sizes)
        never = len(sequence)
        self.next_after = [never] * len(sequence)  # position of the next access to the same key
        last: dict[Key, int] = {}
        for i in range(len(sequence) - 1, -1, -1):
            self.next_after[i] = last.get(sequence[i], never)
            last[sequence[i]] = i
        self.next_use: dict[Key, int] = {}
        self.exact = len({sizes[k] for k in set(sequence)}) <= 1

    def touch(self, key, pos):
        self.next_use[key] = self.next_after[pos]

    def victim(self):
        return max(self.resident, key=self.next_use.__getitem__)

    def result(self):
        return {**super().result(), "exact": self.exact}


def _visits(trace: RoutingTrace) -> Iterator[tuple[int, int | None, list[int], list[int] | None]]:
    """(layer, previous layer in the step, demand experts, predicted experts) per layer run."""
    for step in trace.steps:
        previous = None
        for layer, routing in step.items():
            yield layer, previous, routing.experts(), routing.predicted_experts()
            previous = layer


def _profile_counts(trace: RoutingTrace, profile) -> Mapping[Key, int]:
    if profile is None:  # the trace itself: an oracle profile, optimistic for pinning
        return Counter(accesses(trace))
    if isinstance(profile, RoutingTrace):  # e.g. a calibration run
        return Counter(accesses(profile))
    return profile


def _check_profile(trace: RoutingTrace, profile) -> None:
    """A profile trace recorded on another model would pin experts this one lacks or sizes wrong."""
    if isinstance(profile, RoutingTrace) and (profile.n_experts != trace.n_experts
                                              or profile.expert_bytes != trace.expert_bytes):
        raise TraceError(f"the profile trace is of another model ({profile.n_layers} layers, experts per layer "
                         f"{profile.n_experts}, {profile.total_bytes} expert bytes) than the trace "
                         f"({trace.n_layers} layers, {trace.n_experts}, {trace.total_bytes} bytes)")


def simulate(trace: RoutingTrace, budget: int | float | str, policies: Iterable[str] = POLICIES,
             profile: RoutingTrace | Mapping[Key, int] | None = None,
             pin_fraction: float | None = None) -> dict[str, dict]:
    """Replay `trace` under `budget` (bytes, a fraction, "25%" of all routed experts' bytes, or a
    size like "64MB") for each policy; returns {policy: {"hits", "misses", "hit_rate",
    "bytes_loaded" (every load: demand, prefetch and pinned preload), ...}}.

    profile: usage counts that choose the pinned hot set (pinned, runtime): a RoutingTrace
    (counts of its accesses), a {(layer, expert): count} mapping, or None for this trace's own
    counts. pin_fraction: the share of the budget the hot set may take; None: the runtime's
    rule (`cache.hot_set_bytes`: room for a token's experts left, at most half pinned).
    """
    policies, sizes = tuple(policies), trace.expert_bytes
    _check_profile(trace, profile)
    # The same bytes as the runtime's --cache-budget: shared experts (always run) hold their part.
    budget_bytes = parse_budget(budget, trace.budget_base) - trace.shared_bytes
    largest = max(sizes.values(), default=0)
    if budget_bytes < largest:
        raise BudgetError(f"cache budget {budget_bytes + trace.shared_bytes} bytes leaves {budget_bytes} for routed "
                          f"experts after {trace.shared_bytes} of shared experts, below one expert ({largest} bytes)")
    sequence = accesses(trace)
    needs_pins = {"pinned", "runtime"} & set(policies)
    limit = hot_set_bytes(budget_bytes, trace.token_bytes) if pin_fraction is None else int(pin_fraction * budget_bytes)
    pinned = hot_set(_profile_counts(trace, profile), sizes, budget_bytes, limit) if needs_pins else set()
    layers = sorted({layer for layer, _ in sizes})  # the order MoE layers run in a step
    makers = {"lru": lambda: LRU(budget_bytes, sizes), "lfu": lambda: LFU(budget_bytes, sizes),
              "pinned": lambda: Pinned(budget_bytes, sizes, pinned, trace.token_bytes, layers),
              "runtime": lambda: Runtime(budget_bytes, sizes, pinned, trace.token_bytes, layers),
              "belady": lambda: Belady(budget_bytes, sizes, sequence)}
    unknown = [name for name in policies if name not in makers]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    return {name: _replay(trace, makers[name]()) for name in policies}


def _replay(trace: RoutingTrace, cache: LRU) -> dict:
    pos = 0
    predicted_total = actual_total = overlap = 0
    for layer, previous, demand, predicted in _visits(trace):
        if predicted is not None:
            cache.prefetch(layer, previous, predicted)
            predicted_total, actual_total = predicted_total + len(predicted), actual_total + len(demand)
            overlap += len(set(predicted) & set(demand))
        cache.visit([(layer, expert) for expert in demand], pos)
        pos += len(demand)
    result = cache.result()
    if isinstance(cache, Runtime):  # the predictor's own quality, whatever the cache did with it
        result.update(has_predictions=predicted_total + actual_total > 0,
                      prediction_precision=overlap / predicted_total if predicted_total else 0.0,
                      prediction_recall=overlap / actual_total if actual_total else 0.0)
    return result


def sweep(trace: RoutingTrace, budgets: Iterable[int | float | str], policies: Iterable[str] = POLICIES,
          profile=None, pin_fraction: float | None = None) -> list[dict]:
    """One row per (budget, policy): {"budget", "budget_bytes", "policy", **simulate's result}."""
    policies = tuple(policies)
    return [{"budget": b, "policy": name, **result}
            for b in budgets
            for name, result in simulate(trace, b, policies, profile, pin_fraction).items()]
