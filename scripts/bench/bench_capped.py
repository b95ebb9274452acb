#!/usr/bin/env python3
"""A model bigger than the memory it may use: moetvm's expert cache against llama.cpp's
memory-mapped weights, both under the same memory cap.

Each run is put in one cgroup (v1 memory controller) whose limit is the cap, with the page cache
dropped first (a cold start, as after a boot): page-cache pages count against the cap, so a
model that does not fit is read again from storage as it is used. moetvm runs at a cache budget
(`--budget`, with and without prefetch); llama.cpp (`llama-bench -lm mmap`) with its default
repacked kernels and with `--repack 0`. Both decode random-routed tokens: llama-bench's decode
feeds random token ids, moetvm samples (temperature 1) from random weights. Interleaved rounds,
medians; a run the cap kills is reported as such. Needs root and cgroup v1.

    sudo .venv/bin/python scripts/bench/bench_capped.py [--model granitemoe] [--precision int4s]
        [--cap 420] [--budget 25%] [--threads 1] [--rounds 2] [--out build/bench-capped]

Models, artifacts and GGUF files are made as bench_decode.py makes them (and reused from --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_decode as bd  # noqa: E402 - the same models, artifacts, GGUF files and process runner

CGROUPS = Path("/sys/fs/cgroup/memory")


class CapError(Exception):
    pass


def capped_cgroup(cap_mib: int) -> Path:
    """A cgroup of this process's own limited to `cap_mib` MiB of memory (page cache included)."""
    group = CGROUPS / f"moetvm-bench-capped-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap_mib << 20))
    except OSError as e:
        raise CapError(f"cannot make a memory cgroup at {group} ({e.strerror or e}): this needs root and cgroup v1") from None
    return group


def can_cap() -> bool:
    """Whether this process may make memory cgroups (v1) and drop the page cache."""
    return os.access(CGROUPS, os.W_OK) and (CGROUPS / "memory.limit_in_bytes").is_file() \
        and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def remove_cgroup(group: Path) -> None:
    """The cgroup gone again (its runs have ended): the machine left as it was."""
    try:
        group.rmdir()
    except OSError:
        pass


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def run_capped(group: Path, cmd: list, threads: int, timeout: float) -> dict:
    """`cmd` inside `group` from a cold page cache: {"stdout", "peak_rss_mb", "failcnt"} or
    {"error"} (a kill by the cap reads as signal 9)."""
    for name in ("memory.failcnt", "memory.max_usage_in_bytes"):
        (group / name).write_text("0")
    drop_page_cache()
    inside = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', group, *cmd]
    try:
        out, _, _, rss = bd.run_proc(inside, env=bd.thread_env(threads), timeout=timeout)
    except bd.EngineError as e:  # named by the command, not by the shell that joined the cgroup
        why = str(e).removeprefix("sh ")
        return {"error": f"{Path(str(cmd[0])).name} {why}" + (" (killed)" if "signal 9" in why else ""),
                "failcnt": int((group / "memory.failcnt").read_text())}
    return {"stdout": out, "peak_rss_mb": rss, "failcnt": int((group / "memory.failcnt").read_text()),
            "cgroup_max_mib": int((group / "memory.max_usage_in_bytes").read_text()) >> 20}


def moetvm_capped(group: Path, art: Path, ids: list[int], new: int, threads: int, budget: str, prefetch: bool,
                  timeout: float) -> dict:
    r = run_capped(group, [*bd.moetvm_cmd(), "run", art, "--token-ids", ",".join(map(str, ids)),
                           "--max-new-tokens", new, "--cache-budget", budget, "--temperature", 1, "--seed", 0,
                           "--prefetch" if prefetch else "--no-prefetch", "--json"], threads, timeout)
    if "error" in r:
        return r
    j = json.loads(r.pop("stdout").strip().splitlines()[-1])
    p50 = j["latency_ms"]["p50"]
    return {**r, "ms_per_token": p50, "tok_s": 1e3 / p50, "hit_rate": j["hit_rate"], "expert_loads": j["expert_loads"],
            "storage_mb_per_s": j.get("storage_mb_per_s")}


def llama_capped(group: Path, gguf: Path, new: int, threads: int, repack: bool, timeout: float) -> dict:
    r = run_capped(group, [bd.LLAMA_BIN / "llama-bench", "-m", gguf, "-t", threads, "-r", 1, "-p", 0, "-n", new,
                           "-lm", "mmap", "--repack", int(repack), "-o", "json"], threads, timeout)
    if "error" in r:
        return r
    out = r.pop("stdout")
    (tg,) = json.loads(out[out.index("["):])
    return {**r, "ms_per_token": tg["avg_ns"] / 1e6 / new, "tok_s": tg["avg_ts"]}


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for cell, results in runs.items():
        done = [r for r in results if "error" not in r]
        row = {"cell": cell, "runs": len(results), "completed": len(done),
               "errors": sorted({r["error"] for r in results if "error" in r}),
               "failcnt": max((r["failcnt"] for r in results), default=0)}
        if done:
            row.update(tok_s=statistics.median(r["tok_s"] for r in done), tok_s_range=[min(r["tok_s"] for r in done),
                       max(r["tok_s"] for r in done)], ms_per_token=statistics.median(r["ms_per_token"] for r in done),
                       peak_rss_mb=max(r["peak_rss_mb"] for r in done))
        rows.append(row)
    best_llama = max((r.get("tok_s", 0) for r in rows if r["cell"].startswith("llama.cpp")), default=0)
    for r in rows:
        r["vs_best_llama_cpp"] = r["tok_s"] / best_llama if best_llama and "tok_s" in r else None
    return rows


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.model} {args.precision}, cap {args.cap} MiB (page cache included), {args.threads} thread(s), "
          f"{args.new_tokens} new tokens, medians of {args.rounds} round(s)")
    print(f"{'engine':34s} {'tok/s':>7s} {'range':>13s} {'ms/token':>9s} {'peak RSS MB':>12s} {'vs llama.cpp':>13s}  result")
    for r in rows:
        if "tok_s" in r:
            lo, hi = r["tok_s_range"]
            ratio = f"{r['vs_best_llama_cpp']:.2f}x" if r["vs_best_llama_cpp"] else "-"
            print(f"{r['cell']:34s} {r['tok_s']:7.2f} {lo:6.2f}-{hi:<6.2f} {r['ms_per_token']:9.1f} "
                  f"{r['peak_rss_mb']:12.0f} {ratio:>13s}  {r['completed']}/{r['runs']} ran")
        else:
            print(f"{r['cell']:34s} {'-':>7s} {'':13s} {'-':>9s} {'-':>12s} {'-':>13s}  none ran: {'; '.join(r['errors'])}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["cell"] for r in rows]
    values = [r.get("tok_s", 0) for r in rows]
    bars = ax.barh(names, values, color=["#3b7dd8" if n.startswith("moetvm") else "#d87b3b" for n in names])
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['tok_s']:.2f}" if "tok_s" in r else " killed by the cap" if any("signal 9" in e for e in r["errors"])
                else " failed", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode tok/s (median)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(bd.SHAPES["full"]), default="granitemoe")
    ap.add_argument("--precision", choices=bd.PRECISIONS, default="int4s")
    ap.add_argument("--cap", type=int, default=420, help="MiB for each run, page cache included")
    ap.add_argument("--budget", default="25%", help="moetvm's --cache-budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--no-llama-build", action="store_true", help="do not run scripts/bench/setup-llama-cpp when missing")
    ap.add_argument("--out", type=Path, default=bd.ROOT / "build" / "bench-capped")
    args = ap.parse_args()
    try:
        group = capped_cgroup(args.cap)
        drop_page_cache()
    except (CapError, OSError) as e:
        sys.exit(f"bench_capped: {e}")
    why = bd.llama_setup(build=not args.no_llama_build)
    if why:
        sys.exit(f"bench_capped: llama.cpp {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = bd.make_model(args.model, "full", args.out, seed=0)
    art, _ = bd.moetvm_compile(model_dir, args.precision, args.out, args.timeout)
    gguf = bd.llama_gguf(model_dir, bd.LLAMA_CELL.get(args.precision, args.precision), args.out)
    ids = bd.prompt_ids(model_dir, 16)
    cells = {f"moetvm {args.budget}, prefetch": lambda: moetvm_capped(group, art, ids, args.new_tokens, args.threads,
                                                                       args.budget, True, args.timeout),
             f"moetvm {args.budget}, no prefetch": lambda: moetvm_capped(group, art, ids, args.new_tokens, args.threads,
                                                                          args.budget, False, args.timeout),
             "llama.cpp mmap": lambda: llama_capped(group, gguf, args.new_tokens, args.threads, True, args.timeout),
             "llama.cpp mmap, --repack 0": lambda: llama_capped(group, gguf, args.new_tokens, args.threads, False,
                                                                args.timeout)}
    runs: dict[str, list[dict]] = {cell: [] for cell in cells}
    try:
        for round_ in range(args.rounds):
            for cell, run in cells.items():
                bd.log(f"round {round_ + 1}/{args.rounds}: {cell} under {args.cap} MiB")
                runs[cell].append(run())
                result = runs[cell][-1]
                bd.log(f"  {result['error']}" if "error" in result else f"  {result['tok_s']:.2f} tok/s, "
                       f"peak RSS {result['peak_rss_mb']:.0f} MB, cap hit {result['failcnt']} times")
    finally:
        remove_cgroup(group)
    rows = summarise(runs)
    print_table(rows, args)
    results = {"model": args.model, "precision": args.precision, "cap_mib": args.cap, "budget": args.budget,
               "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds, "machine": bd.cpu_name(),
               "artifact": str(art), "gguf": str(gguf), "summary": rows, "runs": runs}
    (args.out / "capped.json").write_text(json.dumps(results, indent=1))
    png = args.out / "capped.png"
    plot(rows, png, f"{args.model} {args.precision} under a {args.cap} MiB cap (page cache included), "
                    f"{args.threads} thread(s)")
    print(f"\nresults: {args.out / 'capped.json'}\nplot: {png}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
