"""The expert cache: loaded experts, least-recently-used first out, under a budget in bytes.

Demand fetches (`get_many`: a layer's experts for one token) run on the caller's thread, which
hands the layer's other misses to a background loader thread and loads beside it. The layer's
resident experts are marked used before its misses evict anything: a layer never evicts its own.

The loader thread also fetches predicted experts ahead of use (`prefetch`), after any demand:
it never evicts a pinned expert, one the current layer still needs or one of the same
prediction, skips when there is no room, and a failed prefetch leaves nothing behind (the demand
path then loads, or reports, the expert itself). A prefetched expert goes in first out until it
is used, and no demand evicts it before its layer runs (a demand for any of the last prediction's
experts ends that protection for all of them): a wrong prediction then evicts the last
wrong one, not an expert the next token needs (inserted as most recently used, at a budget of
about one token's experts, each wrong one started a chain of evictions: docs/decode-history.md).

Hot experts from a usage profile can be `preload`ed and pinned.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import queue
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator

from moetvm.budget import parse_budget  # noqa: F401 - re-exported: the runtime's budget parser

PIN_FRACTION = 0.5  # the most of a budget the pinned hot set may take


def hot_set_bytes(budget: int, token_bytes: int) -> int:
    """The bytes of `budget` for the pinned hot set, where one token's experts take `token_bytes`.

    Least-recently-used order keeps what consecutive tokens share only while its part of the
    budget holds a whole token's experts: with less, it evicts each expert just before its next
    use and hits nothing. So the pins leave that room, and take at most half. Under a token's
    experts nothing is pinned: eviction then goes by layer (`LayerUse`), which does
    better without pins. The shipped model's held-out trace, hit rate at 12.5/25/37.5/50% of
    its experts (a token's are 25%): 18.8/39.4/48.6/56.0%, against 7.9/16.0/40.6/56.0% for half
    the budget pinned always and 0.0/39.4/44.6/58.7% for plain LRU (`moetvm simulate`)."""
    return int(min(PIN_FRACTION * budget, max(budget - token_bytes, 0)))


class LayerUse:
    """Eviction under a budget smaller than a token's experts, where least-recently-used order
    evicts each expert just before its next use and hits nothing: which run of its layer last
    used each expert, and the order that follows. (By layer alone, without "not used at its
    layer's last run" first, the layers a prefill left holding more experts kept them for good.)"""

    def __init__(self, layers: Iterable[int]):
        self.rank = {layer: i for i, layer in enumerate(layers)}  # layers in the order they run
        self.runs = dict.fromkeys(self.rank, 0)
        self.used_at: dict = {}  # expert key (its layer first) -> the run of its layer that last used it

    def note(self, layer: int, keys: Iterable[Hashable]) -> None:
        """Layer `layer` runs, using `keys`."""
        run = self.runs[layer] = self.runs[layer] + 1
        self.used_at.update(dict.fromkeys(keys, run))

    def order(self, keys: Iterable[Hashable], layer: int) -> Iterator[Hashable]:
        """`keys` (least recently used first) in eviction order while `layer` runs: those their
        layer's last run did not use first, as they come; then by when their layer runs next,
        furthest first: `layer` itself, then the one before it, and so on."""
        rank, runs, used_at = self.rank, self.runs, self.used_at
        fresh = []
        for key in keys:
            if used_at.get(key, 0) < runs[key[0]]:
                yield key
            else:
                fresh.append(key)
        n, current = len(rank), rank[layer]
        yield from sorted(fresh, key=lambda key: (current - rank[key[0]]) % n)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    loaded_bytes: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    preloaded: int = 0
    prefetch_requests: int = 0
    prefetch_loads: int = 0
    prefetch_useful: int = 0  # prefetched experts later hit on demand: misses saved
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    prefetch_skipped: int = 0  # no room without evicting protected experts
    prefetch_failed: int = 0
    demand_waits: int = 0  # demand found its expert still being prefetched and waited

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Entry:
    __slots__ = ("value", "nbytes", "prefetched")

    def __init__(self, value, nbytes: int, prefetched: bool):
        self.value, self.nbytes, self.prefetched = value, nbytes, prefetched


def memory_headroom() -> int:
    """Bytes this process could still take: the system's available memory, or less when a
    cgroup (v2 or v1) limits it."""
    import psutil

    room = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (open(f).read().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            room = min(room, int(limit) - int(usage))
        break
    return room


@dataclass(frozen=True)
class AdaptiveBudget:
    """A cache budget that moves between `floor` and `ceiling` bytes (`--cache-budget 25%..60%`).
    Every `window` demand lookups: when the memory headroom (memory_headroom) is below `reserve`,
    it gives back a step (an eighth of the range) toward the floor, evicting least-recently-used
    experts; else when the window's hit rate is below `target_hit_rate` and a step fits above the
    reserve, it grows a step toward the ceiling. It never shrinks for a good hit rate alone (that
    would oscillate: the misses come back), and never passes the ceiling."""

    floor: int
    ceiling: int
    window: int = 256
    target_hit_rate: float = 0.95
    reserve: int = 256 << 20

    @property
    def step(self) -> int:
        return max((self.ceiling - self.floor) // 8, 1)


class SlowStorage:
    """A storage device of `mbps` MB/s for studying slow storage (an SD card, say): each read
    waits its turn and its time, whichever thread reads, so two threads loading at once get the
    device's bandwidth between them, not twice it."""

    def __init__(self, mbps: float):
        self.bytes_per_s = mbps * 1e6
        self._free_at = 0.0  # (time.monotonic) when the reads asked for so far are done
        self._lock = threading.Lock()

    def read(self, nbytes: int) -> None:
        with self._lock:
            self._free_at = max(time.monotonic(), self._free_at) + nbytes / self.bytes_per_s
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))


class ExpertCache:
    """Thread-safe LRU cache of loaded experts.

    `loader(key)` returns `(value, nbytes)` (public: a caller may wrap it, e.g. to inject faults
    or count loads). An entry is evicted (and its tensors freed, as the
    cache drops its only reference) when inserting another would exceed the budget.
    """

    def __init__(self, budget_bytes: int, loader: Callable[[Hashable], tuple[object, int]],
                 adaptive: AdaptiveBudget | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.budget = budget_bytes
        self.loader = loader
        self.adaptive = adaptive
        self.budget_history: list[tuple[int, int]] = [(0, budget_bytes)]  # (demand lookups, bytes) at each change
        self._window = (0, 0)  # hits, misses at the last decision
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._pinned: set = set()
        self._inflight: dict[Hashable, threading.Event] = {}
        self._queued: set = set()  # prefetches not yet started: a demand takes them over
        self._lock = threading.Lock()
        self._queue: queue.PriorityQueue | None = None
        self._upcoming: frozenset = frozenset()  # the last prefetch's keys: no demand evicts them
        self._arrival = itertools.count()  # first in, first out within a priority
        self.stats = CacheStats()
        self.errors: list[str] = []  # prefetch failures, for the report

    # --- demand path ----------------------------------------------------------------------
    def get(self, key: Hashable, order: Callable[[list], list] | None = None):
        """The expert's value, loading it on a miss. `order`, if given, ranks eviction candidates
        (first evicted first) instead of least-recently-used order."""
        return self.get_many([key], order)[0]

    def get_many(self, keys: list, order: Callable[[list], list] | None = None) -> list:
        """The values of `keys` (distinct: a layer's experts for one token), in that order.

        The resident ones are hits and marked used first; the misses are loaded on two threads
        (this one and the loader, which takes them ahead of its prefetches), then inserted in
        the order of `keys`, evicting as they go. A key the loader is prefetching is waited for
        once this thread has nothing left to load."""
        found = {}
        with self._lock:
            if not self._upcoming.isdisjoint(keys):  # the predicted layer runs: its prediction is spent
                self._upcoming = frozenset()
        while True:
            mine, pending = [], None
            with self._lock:
                for key in keys:
                    if key in found:
                        continue
                    if self.adaptive is not None and (self.stats.hits + self.stats.misses) % self.adaptive.window == 0:
                        self._adapt()
                    entry = self._entries.get(key)
                    if entry is not None:
                        self._entries.move_to_end(key)
                        self.stats.hits += 1
                        if entry.prefetched:
                            entry.prefetched = False
                            self.stats.prefetch_useful += 1
                        found[key] = entry.value
                    elif key in self._inflight and key not in self._queued:
                        pending = pending or self._inflight[key]  # being loaded (a prefetch under way)
                    else:  # not loading, or only queued as a prefetch: a miss, loaded here
                        self._queued.discard(key)
                        self._inflight.setdefault(key, threading.Event())
                        self.stats.misses += 1
                        mine.append(key)
                if not mine:
                    if pending is None:
                        return [found[key] for key in keys]
                    self.stats.demand_waits += 1
            if not mine:
                pending.wait()  # its load is under way: wait, then look again (it may have failed)
                continue
            try:
                loaded = self._load_all(mine)
                with self._lock:
                    for key in keys:  # in order: misses inserted, the layer's hits marked used again
                        if key in loaded:
                            value, nbytes = loaded[key]
                            found[key] = value
                            self._insert(key, value, nbytes, prefetched=False, protected=self._upcoming, order=order)
                        elif key in found and key in self._entries:
                            self._entries.move_to_end(key)
            finally:
                for key in mine:
                    self._finish(key)

    def _load_all(self, keys: list) -> dict:
        """{key: (value, nbytes)}: the first loaded here, the others handed to the loader thread,
        those it has not started taken back from the end of its queue (the two meet in the middle).
        One that failed there is loaded again here, so its error is this thread's to raise."""
        handed = [(key, self._request(0, key, Future())) for key in keys[1:]]
        try:
            loaded, started = {keys[0]: self._timed_load(keys[0])}, []
            for key, future in reversed(handed):
                if future.cancel():
                    loaded[key] = self._timed_load(key)
                else:
                    started.append((key, future))
            for key, future in started:
                try:
                    loaded[key] = future.result()
                except Exception:  # noqa: BLE001 - loaded again here, where a lasting error is raised
                    loaded[key] = self._timed_load(key)
            return loaded
        except BaseException:
            for _, future in handed:  # (whatever the loader has not started)
                future.cancel()
            raise

    def _adapt(self) -> None:
        """One decision of the adaptive budget (under the lock), from the last window's hit rate
        and the memory headroom now."""
        policy, stats = self.adaptive, self.stats
        hits, misses = stats.hits - self._window[0], stats.misses - self._window[1]
        if hits + misses == 0:
            return
        self._window = (stats.hits, stats.misses)
        headroom = memory_headroom()
        budget = self.budget
        if headroom < policy.reserve:
            budget = max(policy.floor, budget - policy.step)
        elif hits / (hits + misses) < policy.target_hit_rate and headroom - policy.step >= policy.reserve:
            budget = min(policy.ceiling, budget + policy.step)
        if budget == self.budget:
            return
        pinned = sum(self._entries[k].nbytes for k in self._pinned if k in self._entries)
        budget = max(budget, pinned)  # pinned experts stay (preload kept them within the floor)
        for key in [k for k in self._entries if k not in self._pinned]:
            if self.stats.resident_bytes <= budget:
                break
            entry = self._entries.pop(key)
            self.stats.resident_bytes -= entry.nbytes
            self.stats.evictions += 1
            self.stats.prefetch_wasted += entry.prefetched
        self.budget = max(budget, self.stats.resident_bytes)
        self.budget_history.append((stats.hits + stats.misses, self.budget))

    def _timed_load(self, key):
        t0 = time.perf_counter()
        value, nbytes = self.loader(key)
        with self._lock:
            self.stats.loads += 1
            self.stats.loaded_bytes += nbytes
            self.stats.load_seconds += time.perf_counter() - t0
        return value, nbytes

    def _finish(self, key) -> None:
        with self._lock:
            event = self._inflight.pop(key, None)
        if event is not None:
            event.set()

    def _insert(self, key, value, nbytes: int, prefetched: bool, protected, order=None) -> bool:
        """Make room (LRU first, or by `order`; never pinned or protected ones) and insert;
        False if there is no room."""
        if nbytes > self.budget:
            raise ValueError(f"expert {key} needs {nbytes} bytes, more than the whole cache budget ({self.budget})")
        victims, free = [], self.budget - self.stats.resident_bytes
        candidates = [k for k in self._entries if k not in self._pinned and k not in protected]
        for k in order(candidates) if order and free < nbytes else candidates:
            if free >= nbytes:
                break
            victims.append(k)
            free += self._entries[k].nbytes
        if free < nbytes:
            return False
        for k in victims:
            e = self._entries.pop(k)
            self.stats.resident_bytes -= e.nbytes
            self.stats.evictions += 1
            self.stats.prefetch_wasted += e.prefetched
        self._entries[key] = _Entry(value, nbytes, prefetched)
        self.stats.resident_bytes += nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)
        assert self.stats.resident_bytes <= self.budget
        return True

    # --- warm-up ---------------------------------------------------------------------------
    def preload(self, keys: Iterable[Hashable], pin: bool = True) -> int:
        """Load `keys` now (in order, while they fit) and pin them; returns how many."""
        done = 0
        for key in keys:
            value, nbytes = self.loader(key)
            with self._lock:
                if self.stats.resident_bytes + nbytes > self.budget:
                    break
                self._insert(key, value, nbytes, prefetched=False, protected=())
                if pin:
                    self._pinned.add(key)
                self.stats.preloaded += 1
                self.stats.loaded_bytes += nbytes
                done += 1
        return done

    # --- prefetch --------------------------------------------------------------------------
    def prefetch(self, keys: Iterable[Hashable], protected: Iterable[Hashable] = (), order=None) -> None:
        """Ask the loader thread for `keys`; returns at once. `protected` (the experts the
        current layer still needs) and `keys` are never evicted to make room for them."""
        keys = list(keys)
        protected = frozenset(protected) | frozenset(keys)
        with self._lock:
            self._upcoming = frozenset(keys)
        for key in keys:
            with self._lock:
                if key in self._entries or key in self._inflight:
                    if key in self._entries:
                        self._entries.move_to_end(key)  # wanted soon: keep it
                    continue
                self._inflight[key] = threading.Event()
                self._queued.add(key)
                self.stats.prefetch_requests += 1
            self._request(1, key, (protected, order))

    def _request(self, priority: int, key, detail):
        """Queue a load for the loader thread (started on first use): a demand's (0, `detail` its
        Future) before a prefetch (1, `detail` its (protected, order)). Returns `detail`."""
        if self._queue is None:
            self._queue = queue.PriorityQueue()
            # The thread holds the cache weakly: a dropped model (and its experts) is freed, and
            # its thread ends, instead of living as long as the process.
            thread = threading.Thread(target=_loader_loop, args=(weakref.ref(self), self._queue),
                                      name="moetvm-loader", daemon=True)
            thread.start()
            # A daemon thread still inside a TVM call (GIL released) when the interpreter finalizes
            # is ended there by pthread_exit, whose unwinding through TVM's C++ frames aborts the
            # process ("terminate called without an active exception"): stop it first, at exit.
            stop = functools.partial(_stop_loader, self._queue, thread)
            atexit.register(stop)
            # Not at exit: weakref.finalize runs live finalizers from its own atexit hook, which,
            # registered after `stop`, ran first, unregistered it and left the thread loading
            # the queued experts while the interpreter finalized (the same abort, ~1 in 60 exits).
            weakref.finalize(self, _retire_loader, self._queue, stop).atexit = False
        self._queue.put((priority, next(self._arrival), key, detail))
        return detail

    def drain(self) -> None:
        """Wait until every request to the loader thread has finished (tests, orderly shutdown)."""
        if self._queue is not None:
            self._queue.join()

    def _load_handed(self, key, future: Future) -> None:
        """A demand's miss, on the loader thread, unless the demand took it back."""
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(self._timed_load(key))
            except Exception as e:  # noqa: BLE001 - the demand's thread loads it again
                future.set_exception(e)

    def _prefetch_one(self, key, protected, order) -> None:
        with self._lock:
            taken_over = key not in self._queued  # a demand fetch is loading it
            self._queued.discard(key)
        if taken_over:
            return
        try:
            value, nbytes = self._timed_load(key)
            with self._lock:
                self.stats.prefetch_loads += 1
                if self._insert(key, value, nbytes, prefetched=True, protected=protected, order=order):
                    self._entries.move_to_end(key, last=False)  # first out, until used
                else:
                    self.stats.prefetch_skipped += 1
        except Exception as e:  # noqa: BLE001 - a failed prefetch must not poison the cache
            with self._lock:
                self.stats.prefetch_failed += 1
                self.errors.append(f"prefetch of {key}: {e}")
        finally:
            self._finish(key)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)


_STOPS = itertools.count()


def _stop_request() -> tuple:
    return (-1, next(_STOPS), None, None)  # first out of the queue: the loader thread ends


def _stop_loader(requests: queue.PriorityQueue, thread: threading.Thread) -> None:
    """At exit: drop the requests not started, let the load in progress finish, end the thread."""
    while True:
        try:
            priority, _, _, detail = requests.get_nowait()
        except queue.Empty:
            break
        if priority == 0:
            detail.cancel()  # a demand's Future: its thread loads it itself
        requests.task_done()
    requests.put(_stop_request())
    thread.join()


def _retire_loader(requests: queue.PriorityQueue, stop) -> None:
    """The cache was collected: end its thread, and forget it at exit."""
    requests.put(_stop_request())
    atexit.unregister(stop)


def _loader_loop(cache_ref, requests: queue.PriorityQueue) -> None:
    """The loader thread: one request at a time until its cache is gone (a stop request is queued when
    the cache is collected)."""
    while True:
        priority, _, key, detail = requests.get()
        cache = cache_ref() if priority >= 0 else None
        try:
            if cache is None:
                return
            if priority == 0:
                cache._load_handed(key, detail)
            else:
                cache._prefetch_one(key, *detail)
        finally:
            del cache
            requests.task_done()
