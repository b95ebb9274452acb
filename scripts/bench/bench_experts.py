#!/usr/bin/env python3
"""Per-expert latency: TVM kernels at fp32 / fp16 / int8 / int4 against PyTorch eager fp32 and
PyTorch's dynamic int8 quantization, on one reference-model expert (SwiGLU 128 -> 256 -> 128).

Every implementation runs in the same process, interleaved round by round, and the table shows
medians over all rounds. The bandwidth floor is the expert's weight bytes divided by this
machine's measured read bandwidth (bench_decode.read_bandwidth over 256 MB): a batch-1 expert must read all its
weights, so no kernel can beat it once weights come from DRAM (these experts fit in cache, so
the floor is a reference line, not a hard bound here).

    .venv/bin/python scripts/bench/bench_experts.py [--tokens 1 16] [--rounds 30] [--calls 200]
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

from moetvm.compiler import quant
from moetvm.compiler.quant_kernels import expert_module
from moetvm.compiler.lowering import build_library
from moetvm.compiler.models import load_model_source
from moetvm.targets import get_target
from moetvm.verify import relative_error

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import read_bandwidth  # noqa: E402 - one measurement of the floor for every benchmark


def timer(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (TVM: TVM_NUM_THREADS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    expert = load_model_source("reference").blocks[0].moe.experts[0].eval()
    weights = quant.kernel_layout(expert.w_gate.weight.detach().numpy(), expert.w_up.weight.detach().numpy(),
                                  expert.w_down.weight.detach().numpy())
    with tempfile.TemporaryDirectory(prefix="moetvm-bench-") as tmp:  # libraries and artifacts, removed after
        workdir = Path(tmp)
        impls, sizes = {}, {}
        for name in quant.SCHEMES:
            s = quant.scheme(name, 32)
            path = workdir / f"{s.tag}.so"
            build_library(expert_module(128, 256, s, "expert"), get_target("host"), path)
            vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
            stored = quant.quantize_expert(weights, s)
            sizes[f"TVM {s.tag}"] = quant.nbytes(stored)
            impls[f"TVM {s.tag}"] = (vm["expert"], [tvm.runtime.tensor(stored[n]) for n, _, _ in quant.expert_params(128, 256, s)])
        dynamic = torch.ao.quantization.quantize_dynamic(expert, {torch.nn.Linear}, dtype=torch.qint8)
        sizes["PyTorch eager fp32"] = sum(w.nbytes for w in weights.values())
        sizes["PyTorch dynamic int8"] = 3 * 128 * 256 + 4 * 3 * 4  # int8 weights + per-tensor scale/zero
        bandwidth = read_bandwidth(256)
        print(f"memory bandwidth (NumPy 256 MB copy): {bandwidth / 1e9:.1f} GB/s; torch threads {args.threads}; "
              f"{args.rounds} rounds x {args.calls} calls, interleaved", file=sys.stderr)

        for tokens in args.tokens:
            x_np = np.random.default_rng(0).standard_normal((tokens, 128)).astype(np.float32)
            x_tvm, x_t = tvm.runtime.tensor(x_np), torch.from_numpy(x_np)
            calls = {name: (lambda f=f, w=w: f(x_tvm, *w)) for name, (f, w) in impls.items()}
            with torch.no_grad():
                calls["PyTorch eager fp32"] = lambda: expert(x_t)
                calls["PyTorch dynamic int8"] = lambda: dynamic(x_t)
                reference = expert(x_t).numpy()
                for name, (f, w) in impls.items():  # sanity: every kernel computes the expert
                    err = relative_error(f(x_tvm, *w).numpy(), reference)
                    assert err < 0.2, (name, err)
                samples = {name: [] for name in calls}
                for name, fn in calls.items():
                    timer(fn, 20)  # warm up
                for _ in range(args.rounds):
                    for name, fn in calls.items():
                        samples[name].append(timer(fn, args.calls))
            eager = statistics.median(samples["PyTorch eager fp32"])
            print(f"\nexpert SwiGLU 128x256, {tokens} token(s): median latency")
            print(f"{'implementation':22s} {'weights KB':>10s} {'median us':>9s} {'vs eager':>8s} {'floor us':>8s} {'x floor':>7s}")
            for name, times in samples.items():
                med = statistics.median(times)
                floor = sizes[name] / bandwidth
                print(f"{name:22s} {sizes[name] / 1e3:10.1f} {med * 1e6:9.2f} {eager / med:7.2f}x {floor * 1e6:8.2f} "
                      f"{med / floor:7.1f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
