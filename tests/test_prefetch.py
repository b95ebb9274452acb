"""The runtime's smart cache: traces agree with the simulator, prefetch never changes results,
survives slow and failing loads, and the byte ceiling holds."""

import random
import subprocess
import sys
import threading
import time

import numpy as np

from moetvm.compiler.models import ASSETS
from moetvm.runtime import load_model
from moetvm.runtime.cache import ExpertCache, SlowStorage
from moetvm.runtime.simulator import simulate
from moetvm.runtime.trace import RoutingTrace


def _decode(model, tokens):
    """Teacher-forced decode, one token per step; returns the logits of every step."""
    cache, out = model.new_cache(), []
    for t in tokens:
        logits, cache = model.step(np.array([[t]], dtype=np.int64), cache)
        out.append(logits[0, -1])
    return np.stack(out)


def test_simulated_lru_equals_runtime_cache(reference_artifact, heldout_tokens):
    model = load_model(reference_artifact, cache_budget="25%", prefetch=False, preload=0)  # plain LRU
    model.start_trace()
    _decode(model, heldout_tokens[100:260])
    trace = model.stop_trace()
    stats = model.cache.stats
    sim = simulate(trace, model.cache.budget, policies=("lru",))["lru"]
    assert (sim["hits"], sim["misses"]) == (stats.hits, stats.misses)
    assert len(trace.steps) == 160 and trace.n_layers == 4
    # Lookahead predictions are recorded for every layer after the first.
    assert all(step[1].predicted is not None and step[0].predicted is None for step in trace.steps)


def test_under_a_tokens_experts_the_runtime_evicts_by_layer_as_simulated(reference_artifact, heldout_tokens):
    # 12.5% holds half a token's experts: LRU would evict each one just before its next use.
    model = load_model(reference_artifact, cache_budget="12.5%")
    model.start_trace()
    _decode(model, heldout_tokens[100:260])
    trace = model.stop_trace()
    stats = model.cache.stats
    sim = simulate(trace, model.cache.budget, policies=("lru", "pinned"))
    assert stats.preloaded == 0 and (sim["pinned"]["hits"], sim["pinned"]["misses"]) == (stats.hits, stats.misses)
    assert sim["lru"]["hits"] == 0 and stats.hits > 0.1 * (stats.hits + stats.misses)


def test_shipped_trace_runtime_policy_near_belady():
    """Acceptance: at 25% of experts, the runtime policy has at most 1.15x Belady's misses and
    at least 5 points higher hit rate than plain LRU."""
    trace = RoutingTrace.load(ASSETS / "heldout.trace")
    r = simulate(trace, "25%")
    assert r["runtime"]["misses"] <= 1.15 * r["belady"]["misses"], (r["runtime"]["misses"], r["belady"]["misses"])
    assert r["runtime"]["hit_rate"] >= r["lru"]["hit_rate"] + 0.05
    assert r["belady"]["exact"]  # one expert size: MIN is the true optimum here


def test_prefetch_with_slow_storage_gives_identical_outputs(reference_artifact, heldout_tokens):
    tokens = heldout_tokens[500:540]
    plain = load_model(reference_artifact, cache_budget="25%")
    slow = load_model(reference_artifact, cache_budget="25%", prefetch=True, storage_mbps=50)
    assert np.array_equal(_decode(plain, tokens), _decode(slow, tokens))
    # Off unless asked for: timed, it was slower in every configuration measured (load_model).
    assert plain.stats()["prefetch"]["enabled"] is False and plain.cache.stats.prefetch_requests == 0
    slow.cache.drain()
    p = slow.stats()["prefetch"]
    assert p["loads"] > 0 and p["useful"] > 0 and p["failed"] == 0
    assert slow.cache.stats.peak_resident_bytes <= slow.cache.budget


def test_failed_prefetch_does_not_poison_the_cache(reference_artifact, heldout_tokens):
    tokens = heldout_tokens[800:830]
    expected = _decode(load_model(reference_artifact, cache_budget="25%"), tokens)
    model = load_model(reference_artifact, cache_budget="25%", prefetch=True)
    real_loader = model.cache.loader

    def flaky(key):  # storage that fails for every other expert, but only on the prefetch thread
        if threading.current_thread().name == "moetvm-loader" and key[1] % 2:
            raise OSError(f"injected read error for {key}")
        return real_loader(key)

    model.cache.loader = flaky
    assert np.array_equal(_decode(model, tokens), expected)
    model.cache.drain()
    s = model.cache.stats
    assert s.prefetch_failed > 0 and all("injected read error" in e for e in model.cache.errors)
    assert s.resident_bytes == sum(model.cache._entries[k].nbytes for k in model.cache.keys())
    assert all(k in model.cache for k in model.cache.keys()) and s.resident_bytes <= model.cache.budget


def test_budget_never_exceeded_with_prefetch_and_threads():
    sizes = {k: random.Random(k).randint(1, 9) for k in range(30)}
    cache = ExpertCache(20, lambda k: (time.sleep(0.0005) or f"w{k}", sizes[k]))
    cache.preload([0, 1])

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(300):
            cache.get(rng.randrange(30))
            cache.prefetch([rng.randrange(30) for _ in range(2)], protected=[rng.randrange(30)])
            assert cache.stats.resident_bytes <= 20

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.drain()
    s = cache.stats
    assert s.prefetch_failed == 0, cache.errors  # an over-budget insert would fail its assertion
    assert s.peak_resident_bytes <= 20 and s.hits + s.misses == 1800
    assert 0 in cache and 1 in cache  # pinned by preload: never evicted


def test_a_layers_misses_load_on_two_threads():
    threads, gate = [], threading.Event()

    def load(key):
        threads.append(threading.current_thread().name)
        if threads[-1] == "moetvm-loader":
            gate.set()
        elif key != "a":
            gate.wait(5)  # this thread's load lasts until the loader thread is inside one too
        return f"w{key}", 1

    cache = ExpertCache(10, load)
    cache.get("a")  # one miss: this thread alone (no loader thread yet)
    assert threads == ["MainThread"]
    assert cache.get_many(["a", "b", "c", "d"]) == ["wa", "wb", "wc", "wd"]
    assert sorted(set(threads[1:])) == ["MainThread", "moetvm-loader"] and len(threads) == 4
    s = cache.stats
    assert (s.hits, s.misses, s.loads) == (1, 4, 4) and cache.keys() == ["a", "b", "c", "d"]


def test_misses_the_loader_has_not_started_are_taken_back():
    # The loader thread is held inside a prefetch: the demand loads all its misses itself.
    release, loads = threading.Event(), []

    def load(key):
        loads.append((key, threading.current_thread().name))
        if key == "slow":
            release.wait(5)
        return key, 1

    cache = ExpertCache(10, load)
    cache.prefetch(["slow"])
    while not loads:
        time.sleep(0.001)
    assert cache.get_many(["a", "b", "c"]) == ["a", "b", "c"]
    assert [k for k, t in loads if t == "MainThread"] == ["a", "c", "b"]  # first, then from the end
    release.set()
    cache.drain()
    assert sorted(cache.keys()) == ["a", "b", "c", "slow"]


def test_a_miss_that_fails_on_the_loader_is_loaded_again_and_a_lasting_error_raised():
    def load(key):
        if key == "bad" or (key == "flaky" and threading.current_thread().name == "moetvm-loader"):
            raise OSError(f"cannot read {key}")
        return key, 1

    cache = ExpertCache(10, load)
    assert cache.get_many(["a", "flaky"]) == ["a", "flaky"]
    try:
        cache.get_many(["b", "bad"])
        raise AssertionError("expected the read error")
    except OSError as e:
        assert "cannot read bad" in str(e)
    cache.drain()
    assert "bad" not in cache and cache.stats.resident_bytes == len(cache.keys())


def test_a_prefetch_goes_in_first_out_until_used():
    cache = ExpertCache(3, lambda key: (key, 1))
    for key in "abc":
        cache.get(key)
    cache.prefetch(["d"])  # evicts a, the least recently used, and goes in first out: [d b c]
    cache.drain()
    cache.prefetch(["e"])  # a wrong prediction costs the last one, d, not b or c: [e b c]
    cache.drain()
    assert cache.keys() == ["e", "b", "c"]
    cache.get("f")  # no demand evicts the prediction before its layer runs: b goes [e c f]
    assert cache.keys() == ["e", "c", "f"]
    cache.get("e")  # used: now it is most recent [c f e]
    assert cache.keys() == ["c", "f", "e"] and cache.stats.prefetch_useful == 1


def test_a_demand_for_a_predicted_expert_ends_the_predictions_protection():
    # The last layer makes no prediction of its own: had the protection outlived the layer it
    # predicted, a prefetch that filled the cache would have left that layer's misses no room
    # (seen in CI as a prefill that never evicted, with the loader thread ahead of the demand).
    cache = ExpertCache(2, lambda key: (key, 1))
    cache.prefetch(["a", "b"])  # the cache holds the prediction: [b a]
    cache.drain()
    cache.get("a")  # the predicted layer runs [b a]
    cache.get("c")  # b was not used: a wrong prediction goes first [a c]
    assert cache.keys() == ["a", "c"] and cache.stats.evictions == 1


def test_slow_storage_is_one_device_for_all_threads():
    # 4 reads of 0.1 MB at 10 MB/s: 40 ms at least, however many threads read at once.
    storage = SlowStorage(10)
    start = time.monotonic()
    readers = [threading.Thread(target=storage.read, args=(100_000,)) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert time.monotonic() - start >= 0.04


def test_preload_pins_the_hottest_experts(reference_artifact):
    model = load_model(reference_artifact, cache_budget="50%", preload=0.25)
    experts = {(layer.layer, e.index): e for layer in model.manifest.moe_layers for e in layer.experts}
    resident = set(model.cache.keys())
    assert len(resident) == 8 and model.stats()["preloaded"] == 8
    coldest_resident = min(experts[k].usage for k in resident)
    assert all(experts[k].usage <= coldest_resident for k in experts.keys() - resident)


def test_default_preload_leaves_room_for_a_token(reference_artifact):
    # The shipped model's token takes 8 of its 32 experts (4 layers, top-2): 25%.
    pinned = {budget: load_model(reference_artifact, cache_budget=budget).stats()["preloaded"]
              for budget in ("12.5%", "25%", "37.5%", "50%")}
    assert pinned == {"12.5%": 0, "25%": 0, "37.5%": 4, "50%": 8}


EXIT_DURING_PREFETCH = """
import time, tvm_ffi
from moetvm.runtime.cache import ExpertCache
sleep_in_tvm = tvm_ffi.get_global_func("testing.run_check_signal")  # C++ sleep, GIL released
cache = ExpertCache(1 << 20, lambda key: (print("load", key, flush=True), sleep_in_tvm(1), 10)[1:])
cache.prefetch(["a", "b", "c"])
time.sleep(0.3)
print("exiting", flush=True)
"""


def test_exit_while_a_prefetch_is_inside_tvm():
    """A script that ends while the prefetch thread is inside a TVM call exits cleanly: finalizing
    Python with a daemon thread there aborted the process (seen on the emulated board, where loads
    are slow), so the thread is stopped at exit; queued requests are dropped, not loaded."""
    proc = subprocess.run([sys.executable, "-c", EXIT_DURING_PREFETCH], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[:2] == ["load a", "exiting"] and "load b" not in proc.stdout


def test_adaptive_budget_grows_with_misses_and_never_passes_its_ceiling(reference_artifact, heldout_tokens):
    model = load_model(reference_artifact, cache_budget="10%..40%")
    total = model.total_expert_bytes
    model.generate(heldout_tokens[:16], 200, ignore_eos=True)
    stats = model.stats()
    floor, ceiling = stats["cache_budget_range"]
    assert floor == total // 10 and ceiling == total * 40 // 100
    budgets = [b for _, b in stats["cache_budget_history"]]
    assert budgets[0] == floor and max(budgets) > floor  # a 10% cache misses: it grew
    assert all(floor <= b <= ceiling for b in budgets)
    assert stats["peak_resident_expert_bytes"] <= ceiling
    fixed = load_model(reference_artifact, cache_budget="10%")
    fixed.generate(heldout_tokens[:16], 200, ignore_eos=True)
    assert stats["hit_rate"] > fixed.stats()["hit_rate"] and "cache_budget_history" not in fixed.stats()


def test_adaptive_budget_gives_memory_back_when_headroom_is_short():
    """A reserve larger than any machine's memory: every decision is 'memory is short', so a
    cache started at its ceiling steps down to the floor, evicting as it goes."""
    from moetvm.runtime.cache import AdaptiveBudget

    policy = AdaptiveBudget(floor=400, ceiling=1200, window=4, reserve=1 << 62)
    cache = ExpertCache(1200, lambda key: (key, 100), policy)
    for step in range(200):
        cache.get(step % 13)
        assert cache.stats.resident_bytes <= cache.budget <= policy.ceiling
    budgets = [b for _, b in cache.budget_history]
    assert budgets[0] == 1200 and budgets[-1] == 400 and budgets == sorted(budgets, reverse=True)
    assert cache.stats.resident_bytes <= 400
