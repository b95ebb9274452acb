#!/usr/bin/env python3
"""Under load and over time: a stress run (many threads, one model) and a soak run (long greedy
generation) on a compiled LM artifact, in one torch-free runtime process.

    .venv/bin/python scripts/bench/soak.py ARTIFACT [--threads 8] [--per-thread 10000] [--tokens 20000]
        [--cache-budget 19%] [--no-prefetch] [--rss-bound-mb 32] [--out build/soak] [--skip-stress|--skip-soak]

stress: --threads threads each run --per-thread inferences on one shared model (batch 1,
    lengths 1..--max-len drawn with a fixed seed from a pool of --pool distinct inputs), with a
    budget that forces evictions and prefetch on. Every output must equal, bit for bit, the
    single-threaded output for the same input (computed first, on its own model); the cache's
    peak resident bytes must stay within the budget; a watchdog fails the run if no inference
    finishes for --stall-s seconds or the phase exceeds --timeout-s (a deadlock).
soak: greedy generation (prompts from a pool, --gen-tokens new tokens per call) until --tokens
    tokens, on a fresh model. Every --sample-every tokens it samples RSS, open file descriptors,
    threads, loaded experts and resident expert bytes. Repeated prompts must give the same tokens.
    Fails if RSS grows more than --rss-bound-mb after the warm-up (--warmup tokens), or the number
    of open fds or threads grows.

Progress goes to stderr, a JSON summary to stdout, and a plot of RSS over time to
OUT/soak.png (when matplotlib is installed). Exit status 0 when every check passes, 1 otherwise
(the reason, one line, on stderr and in the summary's "failures").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

from moetvm.runtime import load_model

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds open


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Samples:
    """(seconds since start, phase, RSS MB, fds, threads, resident expert MB, tokens) rows."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.marks: list[tuple[float, str]] = []

    def take(self, phase: str, model=None, tokens: int | None = None) -> dict:
        row = {"t": time.perf_counter() - self.t0, "phase": phase, "rss_mb": rss_mb(), "fds": open_fds(),
               "threads": threading.active_count(), "tokens": tokens}
        if model is not None:
            row["experts_loaded"] = len(model.cache.keys())
            row["resident_mb"] = model.cache.stats.resident_bytes / 1e6
        self.rows.append(row)
        return row

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter() - self.t0, label))


# --- stress ---------------------------------------------------------------------------------
def make_pool(rng: np.random.Generator, count: int, max_len: int, vocab: int) -> list[np.ndarray]:
    seen, pool = set(), []
    while len(pool) < count:
        n = int(rng.integers(1, max_len + 1))
        tokens = rng.integers(0, vocab, (1, n), dtype=np.int64)
        if tokens.tobytes() not in seen:
            seen.add(tokens.tobytes())
            pool.append(tokens)
    return pool


def stress(args, samples: Samples, failures: list[str]) -> dict:
    rng = np.random.default_rng(args.seed)
    reference = load_model(args.artifact, cache_budget="100%")
    vocab = int(reference.manifest.model.vocab_size or 256)
    pool = make_pool(rng, args.pool, args.max_len, vocab)
    t0 = time.perf_counter()
    expected = [reference(x) for x in pool]
    single_s = time.perf_counter() - t0
    log(f"stress: {len(pool)} distinct inputs, single-threaded reference in {single_s:.1f} s "
        f"({len(pool) / single_s:.1f} inferences/s)")
    del reference
    gc.collect()

    model = load_model(args.artifact, cache_budget=args.cache_budget, prefetch=not args.no_prefetch)
    budget = model.cache.budget
    # Each thread's job list, fixed by the seed: indices into the pool.
    jobs = [np.random.default_rng(args.seed + 1 + k).integers(0, len(pool), args.per_thread) for k in range(args.threads)]
    done = [0] * args.threads
    identical = [0] * args.threads
    tokens_done = [0] * args.threads
    problems: list[str] = []
    over_budget = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        try:
            for i in jobs[k]:
                out = model(pool[i])
                if np.array_equal(out, expected[i]) and out.dtype == expected[i].dtype:
                    identical[k] += 1
                else:
                    with lock:
                        if len(problems) < 5:
                            diff = float(np.abs(out - expected[i]).max()) if out.shape == expected[i].shape else "shape"
                            problems.append(f"thread {k}: output for pool input {i} (length {pool[i].shape[1]}) "
                                            f"differs from the single-threaded one (max abs diff {diff})")
                if model.cache.stats.resident_bytes > budget:
                    over_budget[0] += 1
                tokens_done[k] += pool[i].shape[1]
                done[k] += 1
        except BaseException as e:  # noqa: BLE001 - reported as a failure
            with lock:
                problems.append(f"thread {k}: {type(e).__name__}: {e}")

    samples.mark("stress")
    first = samples.take("stress", model)
    threads = [threading.Thread(target=worker, args=(k,), name=f"soak-stress-{k}", daemon=True)
               for k in range(args.threads)]
    total = args.threads * args.per_thread
    start = time.perf_counter()
    for t in threads:
        t.start()
    last_count, last_progress, last_log, last_sample = 0, start, start, start
    deadlock = None
    while True:
        alive = [t for t in threads if t.is_alive()]
        if not alive:
            break
        alive[0].join(timeout=0.5)
        now = time.perf_counter()
        count = sum(done)
        if count != last_count:
            last_count, last_progress = count, now
        if now - last_sample >= args.sample_s:
            samples.take("stress", model)
            last_sample = now
        if now - last_log >= args.log_s:
            rate = count / (now - start)
            eta = (total - count) / rate if rate else float("inf")
            log(f"stress: {count}/{total} inferences, {rate:.1f}/s, RSS {rss_mb():.0f} MB, "
                f"resident {model.cache.stats.resident_bytes / 1e6:.2f}/{budget / 1e6:.2f} MB, ETA {eta / 60:.1f} min")
            last_log = now
        if now - last_progress > args.stall_s:
            deadlock = f"no inference finished for {args.stall_s:.0f} s ({count}/{total} done): deadlock?"
            break
        if now - start > args.timeout_s:
            deadlock = f"stress phase exceeded {args.timeout_s:.0f} s ({count}/{total} done)"
            break
    wall = time.perf_counter() - start
    if deadlock is None:
        model.cache.drain()
    last = samples.take("stress", model)
    stress_rss = [r["rss_mb"] for r in samples.rows if r["phase"] == "stress"]
    s = model.cache.stats
    result = {
        "threads": args.threads, "per_thread": args.per_thread, "inferences": sum(done), "planned": total,
        "distinct_inputs": len(pool), "identical_outputs": sum(identical), "wall_s": round(wall, 2),
        "inferences_per_s": round(sum(done) / wall, 2), "tokens_per_s": round(sum(tokens_done) / wall, 1),
        "single_thread_reference_per_s": round(len(pool) / single_s, 2),
        "cache_budget_bytes": budget, "peak_resident_bytes": s.peak_resident_bytes,
        "resident_over_budget_observations": over_budget[0],
        "hit_rate": round(s.hit_rate, 4), "loads": s.loads, "evictions": s.evictions,
        "prefetch_requests": s.prefetch_requests, "prefetch_failed": s.prefetch_failed,
        "demand_waits": s.demand_waits,
        "rss_mb": {"start": round(first["rss_mb"], 1), "end": round(last["rss_mb"], 1), "max": round(max(stress_rss), 1)},
        "fds": {"start": first["fds"], "end": last["fds"]}, "problems": problems,
    }
    if deadlock:
        failures.append(f"stress: {deadlock}")
    if problems:
        failures.append(f"stress: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    if not deadlock and sum(identical) != total:
        failures.append(f"stress: {sum(identical)}/{total} outputs identical to the single-threaded ones")
    if s.peak_resident_bytes > budget or over_budget[0]:
        failures.append(f"stress: peak resident expert bytes {s.peak_resident_bytes} exceed the budget {budget}")
    if s.evictions == 0:
        failures.append(f"stress: no evictions with budget {args.cache_budget}: the cache was not under pressure")
    if s.prefetch_failed:
        failures.append(f"stress: {s.prefetch_failed} prefetches failed ({model.cache.errors[:1]})")
    log(f"stress: {sum(done)} inferences in {wall:.0f} s ({result['inferences_per_s']}/s), "
        f"{sum(identical)} identical, peak resident {s.peak_resident_bytes}/{budget} B, {s.evictions} evictions")
    return result


# --- soak -----------------------------------------------------------------------------------
def soak(args, samples: Samples, failures: list[str]) -> dict:
    rng = np.random.default_rng(args.seed + 1000)
    model = load_model(args.artifact, cache_budget=args.cache_budget, prefetch=not args.no_prefetch)
    vocab = int(model.manifest.model.vocab_size or 256)
    limit = int(model.manifest.model.max_positions or 10**9)
    prompt_max = max(1, min(args.prompt_max_len, limit - args.gen_tokens))
    prompts = [p[0].tolist() for p in make_pool(rng, args.soak_prompts, prompt_max, vocab)]
    gc.collect()
    samples.mark("soak")
    start_row = samples.take("soak", model, tokens=0)
    log(f"soak: {args.tokens} tokens, {len(prompts)} prompts, {args.gen_tokens} new tokens per call, "
        f"RSS {start_row['rss_mb']:.1f} MB, {start_row['fds']} fds")
    seen: dict[tuple[int, int], list[int]] = {}
    produced, calls, mismatches = 0, 0, 0
    next_sample = args.sample_every
    warm_row = None
    start = time.perf_counter()
    last_log = start
    while produced < args.tokens:
        p = calls % len(prompts)
        n = min(args.gen_tokens, args.tokens - produced)
        new = model.generate(prompts[p], n)
        if len(new) != n:
            failures.append(f"soak: generate returned {len(new)} tokens, asked for {n}")
            break
        previous = seen.setdefault((p, n), new)
        mismatches += previous != new
        calls += 1
        produced += n
        if produced >= next_sample or produced >= args.tokens:
            row = samples.take("soak", model, tokens=produced)
            next_sample += args.sample_every
            if warm_row is None and produced >= args.warmup:
                warm_row = row
                samples.mark("warm")
        if time.perf_counter() - last_log >= args.log_s:
            last_log = time.perf_counter()
            rate = produced / (last_log - start)
            log(f"soak: {produced}/{args.tokens} tokens, {rate:.1f} tokens/s, RSS {rss_mb():.1f} MB, "
                f"{open_fds()} fds, {len(model.cache.keys())} experts loaded, ETA {(args.tokens - produced) / rate / 60:.1f} min")
    wall = time.perf_counter() - start
    model.cache.drain()
    gc.collect()
    end_row = samples.take("soak", model, tokens=produced)
    warm_row = warm_row or end_row
    after = [r for r in samples.rows if r["phase"] == "soak" and r["tokens"] is not None and r["tokens"] >= warm_row["tokens"]]
    slope = None
    if len(after) >= 2 and after[-1]["tokens"] > after[0]["tokens"]:
        x = np.array([r["tokens"] for r in after], dtype=float) / 1000
        y = np.array([r["rss_mb"] for r in after])
        slope = float(np.polyfit(x, y, 1)[0])
    growth = end_row["rss_mb"] - warm_row["rss_mb"]
    soak_rows = [r for r in samples.rows if r["phase"] == "soak"]
    s = model.cache.stats
    result = {
        "tokens": produced, "generate_calls": calls, "wall_s": round(wall, 2), "tokens_per_s": round(produced / wall, 1),
        "repeated_prompt_mismatches": mismatches, "warmup_tokens": warm_row["tokens"],
        "rss_mb": {"start": round(start_row["rss_mb"], 1), "after_warmup": round(warm_row["rss_mb"], 1),
                   "end": round(end_row["rss_mb"], 1), "max": round(max(r["rss_mb"] for r in soak_rows), 1),
                   "growth_after_warmup": round(growth, 2), "bound": args.rss_bound_mb},
        "rss_slope_mb_per_1000_tokens": None if slope is None else round(slope, 4),
        "fds": {"start": start_row["fds"], "after_warmup": warm_row["fds"], "end": end_row["fds"],
                "max": max(r["fds"] for r in soak_rows)},
        "threads": {"start": start_row["threads"], "end": end_row["threads"]},
        "experts_loaded": {"min": min(r["experts_loaded"] for r in soak_rows), "max": max(r["experts_loaded"] for r in soak_rows)},
        "resident_mb_max": round(max(r["resident_mb"] for r in soak_rows), 3),
        "cache_budget_bytes": model.cache.budget, "peak_resident_bytes": s.peak_resident_bytes,
        "hit_rate": round(s.hit_rate, 4), "evictions": s.evictions, "samples": len(soak_rows),
    }
    if growth > args.rss_bound_mb:
        failures.append(f"soak: RSS grew {growth:.1f} MB after warm-up (bound {args.rss_bound_mb} MB)")
    if end_row["fds"] > start_row["fds"]:
        failures.append(f"soak: open fds grew from {start_row['fds']} to {end_row['fds']}")
    if end_row["threads"] > max(start_row["threads"], warm_row["threads"]):
        failures.append(f"soak: threads grew from {start_row['threads']} to {end_row['threads']}")
    if mismatches:
        failures.append(f"soak: {mismatches} repeated prompts generated different tokens")
    if s.peak_resident_bytes > model.cache.budget:
        failures.append(f"soak: peak resident expert bytes {s.peak_resident_bytes} exceed the budget {model.cache.budget}")
    log(f"soak: {produced} tokens in {wall:.0f} s, RSS {start_row['rss_mb']:.1f} -> {warm_row['rss_mb']:.1f} (warm) -> "
        f"{end_row['rss_mb']:.1f} MB, slope {slope if slope is None else round(slope, 4)} MB/1000 tokens, "
        f"fds {start_row['fds']} -> {end_row['fds']}")
    return result


def plot(samples: Samples, path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = samples.rows
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    t = [r["t"] for r in rows]
    ax.plot(t, [r["rss_mb"] for r in rows], ".-", ms=3, label="RSS (MB)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax2.plot(t, [r.get("resident_mb", np.nan) for r in rows], ".-", ms=3, label="resident experts (MB)")
    ax2.plot(t, [r["fds"] for r in rows], "-", label="open fds")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left", fontsize=8)
    for when, label in samples.marks:
        for a in (ax, ax2):
            a.axvline(when, color="grey", ls="--", lw=0.8)
        ax.annotate(label, (when, 1), xycoords=("data", "axes fraction"), fontsize=8, va="top")
    ax.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("artifact", type=Path, help="a compiled causal LM artifact directory")
    ap.add_argument("--cache-budget", default="19%", help="expert cache budget (small enough to evict)")
    ap.add_argument("--no-prefetch", action="store_true", help="run without the prefetch thread")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-stress", action="store_true")
    ap.add_argument("--skip-soak", action="store_true")
    g = ap.add_argument_group("stress")
    g.add_argument("--threads", type=int, default=8)
    g.add_argument("--per-thread", type=int, default=10000, help="inferences per thread (M)")
    g.add_argument("--pool", type=int, default=200, help="distinct inputs (each checked against the single-threaded output)")
    g.add_argument("--max-len", type=int, default=64, help="input lengths are 1..MAX_LEN")
    g.add_argument("--stall-s", type=float, default=120.0, help="watchdog: fail when no inference finishes for this long")
    g.add_argument("--timeout-s", type=float, default=6 * 3600.0, help="watchdog: fail when the stress phase runs longer")
    g.add_argument("--sample-s", type=float, default=2.0, help="RSS sample interval during stress (s)")
    g = ap.add_argument_group("soak")
    g.add_argument("--tokens", type=int, default=20000, help="tokens generated in all (T)")
    g.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generate call")
    g.add_argument("--prompt-max-len", type=int, default=32, help="prompt lengths are 1..this")
    g.add_argument("--soak-prompts", type=int, default=50, help="distinct prompts (repeats must give the same tokens)")
    g.add_argument("--sample-every", type=int, default=200, help="sample RSS, fds, experts every K tokens")
    g.add_argument("--warmup", type=int, default=None, help="tokens before RSS is expected flat (default: 10%% of --tokens)")
    g.add_argument("--rss-bound-mb", type=float, default=32.0, help="fail when RSS grows more than this after warm-up")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "soak", help="folder for the plot")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--log-s", type=float, default=10.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.sample_every, args.tokens // 10)

    failures: list[str] = []
    samples = Samples()
    samples.take("load")
    summary: dict = {"artifact": str(args.artifact), "cache_budget": args.cache_budget, "prefetch": not args.no_prefetch,
                     "pid": os.getpid(), "cpus": os.cpu_count()}
    try:
        if not args.skip_stress:
            summary["stress"] = stress(args, samples, failures)
            gc.collect()
        if not args.skip_soak:
            summary["soak"] = soak(args, samples, failures)
    except Exception as e:  # noqa: BLE001 - one line, exit 1
        failures.append(f"{type(e).__name__}: {e}")
    summary["torch_imported"] = "torch" in sys.modules
    if summary["torch_imported"]:
        failures.append("torch was imported into the runtime process")
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    summary["failures"] = failures
    summary["ok"] = not failures
    if not args.no_plot and samples.rows:
        title = f"{args.artifact.name}: budget {args.cache_budget}, prefetch {'on' if not args.no_prefetch else 'off'}"
        summary["plot"] = plot(samples, args.out / "soak.png", title)
        (args.out / "samples.json").write_text(json.dumps(samples.rows))
    print(json.dumps(summary, indent=1))
    if failures:
        log(f"FAIL: {failures[0]}" + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""))
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
