"""The expert cache: loaded experts, least-recently-used first out, under a budget in bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def parse_budget(budget: int | float | str, total_bytes: int) -> int:
    """Bytes from an int, a float fraction, "25%", or a size such as "64MB" / "3MiB"."""
    if isinstance(budget, bool):
        raise ValueError(f"bad cache budget {budget!r}")
    if isinstance(budget, int):
        return budget
    if isinstance(budget, float):
        return int(budget * total_bytes)
    text = str(budget).strip().upper()
    try:
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total_bytes)
        for suffix, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                              ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if text.endswith(suffix):
                return int(float(text[: -len(suffix)]) * scale)
        return int(text)
    except ValueError:
        raise ValueError(f"bad cache budget {budget!r}: use bytes, a size like 64MB, or a percentage like 25%") from None


class ExpertCache:
    """Thread-safe LRU cache of loaded experts.

    `loader(key)` returns `(value, nbytes)`. An entry is evicted (and its tensors freed, as the
    cache drops its only reference) when inserting another would exceed the budget.
    """

    def __init__(self, budget_bytes: int, loader: Callable[[Hashable], tuple[object, int]]):
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.budget = budget_bytes
        self._loader = loader
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Hashable):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry[0]
            self.stats.misses += 1
        t0 = time.perf_counter()
        value, nbytes = self._loader(key)
        elapsed = time.perf_counter() - t0
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += elapsed
            if key not in self._entries:  # another thread may have loaded it meanwhile
                self._insert(key, value, nbytes)
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def _insert(self, key, value, nbytes: int) -> None:
        if nbytes > self.budget:
            raise ValueError(f"expert {key} needs {nbytes} bytes, more than the whole cache budget ({self.budget})")
        while self.stats.resident_bytes + nbytes > self.budget:
            _, (_, freed) = self._entries.popitem(last=False)
            self.stats.resident_bytes -= freed
            self.stats.evictions += 1
        self._entries[key] = (value, nbytes)
        self.stats.resident_bytes += nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)
