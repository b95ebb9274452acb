#!/usr/bin/env python
"""Where a decode token's time goes, by sampling: Linux perf's cpu-clock samples of this process
decoding an artifact, attributed to the artifact's kernels (named from its libraries' own symbol
tables), TVM's runtime (the Relax VM, allocators, workspace pool, thread pool), the FFI, Python,
NumPy and libc.

  .venv/bin/python scripts/bench/profile_decode.py ARTIFACT [--threads 1] [--tokens 256] [--json OUT]

`moetvm run --json`'s outside_compiled_share times the calls into compiled functions, so the Relax
VM's own work (argument checks, allocations, builtins between kernels) counts as inside them;
here it is outside the kernels, where it is. Shares are of CPU time, all threads together (at one
thread, of the wall time too). Needs `perf` (linux-tools) and permission to profile one's own
process (kernel.perf_event_paranoid <= 2, the default).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNEL_SUFFIX = "_compute_"  # TVM's name for a PrimFunc's body; the plain name is its FFI entry
FFI_PREFIX = "__tvm_ffi_"
CATEGORIES = [  # (name, test on a DSO's file name), first match wins
    ("TVM runtime (VM, allocators, threads)", lambda d: d.startswith("libtvm_runtime")),
    ("FFI (tvm_ffi)", lambda d: d.startswith("libtvm_ffi") or d.startswith("core.cpython")),
    ("Python", lambda d: d.startswith("libpython") or d == "python" or d.startswith("python3")),
    ("NumPy", lambda d: d.startswith("_multiarray")),
    ("libc, libstdc++, libm (malloc, memcpy)", lambda d: d.startswith(("libc.", "libc-", "libstdc++", "libm.", "ld-linux"))),
    ("OS kernel", lambda d: d.startswith("[kernel")),
]


# TVM's thread pool waits by sched_yield: a worker for its next task, the launching thread at a
# parallel loop's end for the others. Inside a kernel call, and counted with the kernels: every
# sample whose call chain passes through the yield, the syscall's entry and libc's wrapper
# included. Filed by leaf alone (the scheduler's symbols), the entry and the wrapper (1.4% of a
# 2-thread GraniteMoE token's main-thread samples) counted as outside.
POOL_WAIT = "kernels: parallel loops' waits (sched_yield)"
POOL_WAIT_FRAMES = re.compile(r"sched_yield|YieldThread")
# A sample in the OS kernel is filed by the user-space code it interrupted: a kernel's first
# write to a page of the KV cache or of its workspace faults (transparent huge pages zero 2 MB),
# and that is the kernel's time. The user frame under a trap is the faulting instruction itself,
# exact even where user stacks, compiled without frame pointers, are not. Filed as the OS
# kernel's, these faults were 0.5% of a 2-thread GraniteMoE token's main-thread samples.
OS_KERNEL = "[kernel.kallsyms]"
FRAME = re.compile(r"^\s*([0-9a-f]+) (.*?) \((.*)\)$")


def fail(message: str) -> None:
    print(f"profile_decode: {message}", file=sys.stderr)
    sys.exit(2)


def symbol_table(library: Path) -> tuple[list[int], list[str]]:
    """A library's function symbols, sorted by address (nm), to name perf's raw addresses: the
    runtime loads verified libraries from memory (memfd), whose files perf cannot read."""
    out = subprocess.run(["nm", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    syms = sorted((int(a, 16), name) for a, kind, name in (line.split(" ", 2) for line in out.splitlines()
                                                           if line.count(" ") >= 2) if kind in "tTwW")
    return [a for a, _ in syms], [n for _, n in syms]


def kernel_name(symbol: str) -> str:
    if symbol.startswith(FFI_PREFIX):
        symbol = symbol[len(FFI_PREFIX):]
    return symbol[:-len(KERNEL_SUFFIX)] if symbol.endswith(KERNEL_SUFFIX) else symbol


def perf_samples(script: str):
    """`perf script -F tid,period,ip,sym,dso` with call chains -> (thread, period, frames), each
    frame (address, symbol, DSO's file name), the leaf first."""
    for block in script.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        head = lines[0].split()
        if len(head) < 2 or not head[0].isdigit():
            continue
        frames = []
        for line in lines[1:]:
            m = FRAME.match(line)
            if m:
                dso = m.group(3).removesuffix(" (deleted)").rsplit("/", 1)[-1].removeprefix("memfd:")
                frames.append((int(m.group(1), 16), m.group(2), dso))
        if frames:
            yield int(head[0]), int(head[1]), frames


def attribute(script: str, libraries: dict[str, Path], main_thread: int) -> dict[str, collections.Counter]:
    """perf script's samples -> the main thread's time by category and by (kernel, library), and
    the other threads' (TVM's pool workers) by category."""
    tables = {}
    out = {"main": collections.Counter(), "kernels": collections.Counter(), "workers": collections.Counter()}
    for thread, period, frames in perf_samples(script):
        main = thread == main_thread
        address, sym, dso = frames[0]
        if dso == OS_KERNEL:  # filed by the user code it interrupted (see OS_KERNEL)
            user = next((f for f in frames if f[2] != OS_KERNEL), None)
            if user is not None and user[2].removesuffix(".so") in libraries:
                address, sym, dso = user
        library = dso.removesuffix(".so")
        if any(POOL_WAIT_FRAMES.search(f[1]) for f in frames):
            category = POOL_WAIT
        elif library in libraries:  # one of the artifact's libraries: name the kernel
            category = f"kernels: {library}"
            if sym == "[unknown]":  # (a memfd library: perf cannot read its symbols)
                addresses, names = tables.get(library) or tables.setdefault(library, symbol_table(libraries[library]))
                i = bisect.bisect_right(addresses, address) - 1
                sym = names[i] if i >= 0 else "?"
            if main:
                out["kernels"][kernel_name(sym), library] += period
        else:
            category = next((name for name, test in CATEGORIES if test(dso)), "other")
        out["main" if main else "workers"][category] += period
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens decoded while sampling")
    ap.add_argument("--context", type=int, default=1,
                    help="prompt tokens, prefilled before sampling starts: the sampled steps attend over context..context+tokens positions")
    ap.add_argument("--frequency", type=int, default=2000, help="samples a second per thread")
    ap.add_argument("--top", type=int, default=12, help="kernels listed")
    ap.add_argument("--json", type=Path, help="also write the shares here")
    a = ap.parse_args()
    if shutil.which("perf") is None:
        fail("`perf` is not installed (Debian: linux-perf; Ubuntu: linux-tools-generic)")
    if a.threads < 1 or a.tokens < 8 or a.context < 1:
        fail("--threads must be >= 1, --tokens >= 8 and --context >= 1")
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # read when TVM's thread pool starts
    from moetvm.artifact import ArtifactError
    from moetvm.runtime import load_model

    try:
        model = load_model(a.artifact, cache_budget="100%", preload=1.0)
    except (ArtifactError, OSError) as e:
        fail(f"{a.artifact}: {e}")
    if model.manifest.kind != "causal_lm":
        fail(f"{a.artifact}: a causal LM artifact is needed, this one is a {model.manifest.kind}")
    libraries = {lib.name: a.artifact / lib.file.path for lib in model.manifest.libraries}
    vocab = model.manifest.model.vocab_size
    prompt = [(3 + i) % vocab for i in range(a.context)]
    model.generate(prompt[:1], 8, ignore_eos=True)  # warm: handles, pages, caches
    model.timings = type(model.timings)()  # the sampled generation's alone
    generation = iter(model.stream(prompt, a.tokens + 1, ignore_eos=True))
    next(generation)  # the prompt's prefill and the first token, before sampling: every sampled step is a decode step
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-g", "-e", "cpu-clock", "-F", str(a.frequency), "-p", str(os.getpid()),
                                 "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # perf attaches
        if perf.poll() is not None:
            fail(f"perf record failed: {perf.stderr.read().strip().splitlines()[-1:] or perf.returncode}")
        print(f"sampling {a.tokens} decoded tokens at {a.threads} thread(s)...", file=sys.stderr)
        for _ in generation:
            pass
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,period,ip,sym,dso"],
                                capture_output=True, text=True)
    if script.returncode != 0:
        fail(f"perf script failed: {script.stderr.strip().splitlines()[-1:] or script.returncode}")
    shares = attribute(script.stdout, libraries, os.getpid())
    categories, kernels, workers = shares["main"], shares["kernels"], shares["workers"]
    total = sum(categories.values())
    if total <= 0:
        fail("perf recorded no samples of this process's main thread")
    stats = model.stats()
    tokens = model.timings.decode_tokens
    token_ms = 1e3 * model.timings.decode_seconds / tokens
    inside = sum(v for k, v in categories.items() if k.startswith("kernels: "))
    worker_total = sum(workers.values())
    worker_kernels = sum(v for k, v in workers.items() if k.startswith("kernels: ") and k != POOL_WAIT)
    result = {
        "artifact": str(a.artifact), "threads": a.threads, "tokens": tokens, "decode_ms_per_token": token_ms,
        "outside_kernels_share": 1 - inside / total,
        "timed_outside_compiled_share": stats.get("outside_compiled_share"),
        "categories": {k: v / total for k, v in categories.most_common()},
        "kernels": [{"kernel": k, "library": lib, "share": v / total} for (k, lib), v in kernels.most_common()],
        "worker_threads": {k: v / worker_total for k, v in workers.most_common()} if worker_total else {},
    }
    print(f"{a.artifact}: {tokens} decode steps at {a.threads} thread(s) after a {a.context}-token prompt, "
          f"{token_ms:.2f} ms a token (mean); "
          f"shares of the main thread's samples, which run every step end to end")
    print(f"\n{'where':<44} {'share':>7}  {'ms/token':>8}")
    for name, share in categories.most_common():
        print(f"{name:<44} {100 * share / total:6.1f}%  {token_ms * share / total:8.2f}")
    print(f"{'outside the kernels':<44} {100 * result['outside_kernels_share']:6.1f}%  "
          f"{token_ms * result['outside_kernels_share']:8.2f}   (timed around the calls, as `run --json` does: "
          f"{100 * (result['timed_outside_compiled_share'] or 0):.1f}%)")
    if worker_total:
        print(f"the other {a.threads - 1} thread(s): {100 * worker_kernels / worker_total:.0f}% of their samples in "
              f"kernels, {100 * workers.get('TVM runtime (VM, allocators, threads)', 0) / worker_total:.0f}% in TVM's "
              f"runtime (the pool's spin-wait), {100 * workers.get(POOL_WAIT, 0) / worker_total:.0f}% waiting for work (sched_yield)")
    print(f"\n{'kernel (main thread)':<56} {'share':>7}  library")
    for (name, library), share in kernels.most_common(a.top):
        print(f"{name:<56} {100 * share / total:6.1f}%  {library}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
