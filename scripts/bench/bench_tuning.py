#!/usr/bin/env python3
"""Untuned vs tuned TVM vs PyTorch eager, per distinct workload and for whole-model decode.

Builds the reference model's distinct kernels twice (default schedules; with the MetaSchedule
database from `moetvm tune`), times them at batch 1 and at a prefill bucket against PyTorch
eager, interleaved round by round in one process (medians), then compiles the model with and
without the database and compares decode latency per token.

    moetvm tune reference --trials 16 --db build/tune-db --only experts --only routers
    .venv/bin/python scripts/bench/bench_tuning.py --db build/tune-db [--tokens 1 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tvm.runtime.vm import VirtualMachine

from moetvm.compiler import BuildTarget, compile_model, quant
from moetvm.compiler.quant_kernels import router_module, expert_module
from moetvm.compiler.lowering import build_library
from moetvm.compiler.tuning import apply_database
from moetvm.compiler.models import load_model_source
from moetvm.runtime import load_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_experts import timer  # noqa: E402 - one timing loop for both benchmarks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = load_model_source("reference")
    block = model.blocks[0].moe
    expert = block.experts[0]
    weights = quant.kernel_layout(expert.w_gate.weight.detach().numpy(), expert.w_up.weight.detach().numpy(),
                                  expert.w_down.weight.detach().numpy())
    s = quant.scheme("fp32")
    with tempfile.TemporaryDirectory(prefix="moetvm-bench-") as tmp:  # libraries and artifacts, removed after
        work = Path(tmp)
        host = BuildTarget.resolve("host")

        def tuned(db):  # one database pass per library: its stats count that library's kernels
            return apply_database(db, host.tvm) if db is not None else None

        kernels = {}
        for label, db in (("TVM default", None), ("TVM tuned", args.db)):
            expert_so, router_so = work / f"expert-{db is not None}.so", work / f"router-{db is not None}.so"
            build_library(expert_module(128, 256, s, "expert"), host, expert_so, tuned(db))
            router = block.router.weight.detach().numpy()
            build_library(router_module([("router", router, None, "softmax")], s), host, router_so, tuned(db))
            kernels[label] = (VirtualMachine(tvm.runtime.load_module(str(expert_so)), tvm.cpu()),
                              VirtualMachine(tvm.runtime.load_module(str(router_so)), tvm.cpu()))
        w = [tvm.runtime.tensor(weights[n]) for n in ("w_gate", "w_up", "w_down")]

        print(f"workload medians over {args.rounds} interleaved rounds x {args.calls} calls (1 thread each)")
        print(f"{'workload':28s} {'tokens':>6s} {'default us':>10s} {'tuned us':>9s} {'eager us':>9s} {'tuned/default':>13s} {'tuned/eager':>11s}")
        for tokens in args.tokens:
            x = np.random.default_rng(0).standard_normal((tokens, 128)).astype(np.float32)
            xt, xp = tvm.runtime.tensor(x), torch.from_numpy(x)
            cases = {
                "expert swiglu 128x256 fp32": {
                    "TVM default": lambda: kernels["TVM default"][0]["expert"](xt, *w),
                    "TVM tuned": lambda: kernels["TVM tuned"][0]["expert"](xt, *w),
                    "eager": lambda: expert(xp),
                },
                "router 128->8 softmax": {
                    "TVM default": lambda: kernels["TVM default"][1]["router"](xt),
                    "TVM tuned": lambda: kernels["TVM tuned"][1]["router"](xt),
                    "eager": lambda: F.softmax(block.router(xp), -1),
                },
            }
            with torch.no_grad():
                for name, impls in cases.items():
                    samples = {k: [] for k in impls}
                    for fn in impls.values():
                        timer(fn, 10)
                    for _ in range(args.rounds):
                        for k, fn in impls.items():
                            samples[k].append(timer(fn, args.calls))
                    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
                    print(f"{name:28s} {tokens:6d} {med['TVM default']:10.2f} {med['TVM tuned']:9.2f} {med['eager']:9.2f} "
                          f"{med['TVM tuned'] / med['TVM default']:13.2f} {med['TVM tuned'] / med['eager']:11.2f}")

        # Whole model: decode latency per token, artifacts compiled without and with the database.
        arts = {label: compile_model(model, target="host", out=work / label.replace(" ", "-"), progress=False, tuning_db=db)
                for label, db in (("default", None), ("tuned", args.db))}
        runtimes = {label: load_model(path) for label, path in arts.items()}
        prompt = list(b"import os\ndef ")
        per_token = {label: [] for label in runtimes}
        for _ in range(3):
            for label, rt in runtimes.items():
                rt.timings.token_latencies.clear()
                rt.generate(prompt, args.decode_tokens)
                per_token[label].extend(rt.timings.token_latencies)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            for _ in range(16):
                nxt = model(ids)[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            eager_ms = (time.perf_counter() - t0) / 16 * 1e3
        d, t = (statistics.median(per_token[k]) * 1e3 for k in ("default", "tuned"))
        print(f"\nwhole-model decode, median ms/token over {len(per_token['tuned'])} tokens: default {d:.2f}, "
              f"tuned {t:.2f} (x{t / d:.2f}); PyTorch eager full-recompute (no KV cache) {eager_ms:.2f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
