#!/usr/bin/env python
"""The decode attention kernel at long context against the read floor of its KV cache (issue 14).

A decode token at context C reads every layer's cached keys and values once, and at 1024
positions that is most of what the token costs over one at a short context. This times
compiler/attention.py's kernel alone, for a model's attention shape and cache dtype, over C
cached positions in every layer's buffers (filled by the compiler's own append kernels, held in
one huge-page block as the runtime holds them), one query position a call, interleaved:

  kernel, cold   each layer's call after reading --evict-mb of other memory (a decode reads its
                 weights between two layers' attention), as in a decode step
  read, cold     NumPy reading the same buffers, in the same order, after the same eviction, on one
                 thread: the floor for this access pattern (many short streams, each started cold)
  kernel, warm   one layer's calls, repeated as many times with nothing evicted (its cache in
                 L2 or L3): the kernel's arithmetic
and the probe's bandwidth (one long stream, bench_decode.read_bandwidth), the floor for any pattern.

  .venv/bin/python scripts/bench/bench_attention.py [--shape granitemoe|olmoe] [--context 1024]
      [--kv-dtype int8|float16|float32] [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

PROBE_MB = 512  # the probe's array, as bench_decode.py's --bandwidth-mb default
SHAPES = {  # query heads, KV heads, head dim, layers: bench_decode.py's models
    "granitemoe": (16, 8, 64, 24),
    "olmoe": (16, 16, 64, 16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="granitemoe")
    ap.add_argument("--context", type=int, default=1024, help="cached positions each call attends to")
    ap.add_argument("--kv-dtype", choices=["int8", "float16", "float32"], default="int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--evict-mb", type=int, default=16, help="memory read between two layers' calls")
    a = ap.parse_args()
    if a.context < 1 or a.rounds < 1 or a.threads < 1 or a.evict_mb < 0:
        sys.exit("bench_attention: --context, --rounds and --threads must be positive, --evict-mb not negative")
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before TVM's thread pool starts

    import numpy as np
    import tvm

    from bench_decode import read_bandwidth
    from moetvm.artifact import DTYPE_BYTES, KVCacheLayout, ModelInfo
    from moetvm.compiler import attention
    from moetvm.compiler.build_target import BuildTarget
    from moetvm.runtime.host_memory import host_arrays

    heads, kv_heads, head_dim, layers = SHAPES[a.shape]
    target = BuildTarget.resolve("host")
    block = attention.key_block(heads, kv_heads)
    dot = a.kv_dtype == "int8" and target.int8_dot and attention.dot_order_fits(head_dim, head_dim, block)
    info = ModelInfo(kv_layout=[layers, kv_heads, head_dim, kv_heads, head_dim],
                     kv_cache=KVCacheLayout("in_place", a.kv_dtype, attention.LANES, block=block, dot=dot))
    multiple = info.kv.capacity_multiple
    capacity = -(-(a.context + 16) // multiple) * multiple  # as a generation reserves: the context and its new tokens
    funcs = {"keys": attention.append_keys(kv_heads, head_dim, a.kv_dtype, block, dot),
             "values": attention.append_values(kv_heads, head_dim, a.kv_dtype, block, dot),
             "attend": attention.cached_attention(heads, kv_heads, head_dim, head_dim, a.kv_dtype, head_dim ** -0.5, block, dot)}
    print(f"bench_attention: building the {a.shape} attention ({heads} heads over {kv_heads} KV heads of {head_dim}, "
          f"{a.kv_dtype} cache{' in dot order' if dot else ''}, block {block}) for {target.tvm}", file=sys.stderr)
    built = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target.tvm)
    append_keys, append_values, attend = (built[n] for n in funcs)

    key_shape, value_shape = info.kv.buffer_shapes(info.kv_layout, 1, capacity)
    _, buffers = host_arrays([(key_shape, a.kv_dtype)] * layers + [(value_shape, a.kv_dtype)] * layers)
    keys, values = buffers[:layers], buffers[layers:]
    rng = np.random.default_rng(0)
    for k, v in zip(keys, values):
        new = [tvm.runtime.tensor(rng.standard_normal((1, kv_heads, a.context, head_dim)).astype(np.float32)) for _ in "kv"]
        append_keys(tvm.runtime.from_dlpack(k), new[0], 0)
        append_values(tvm.runtime.from_dlpack(v), new[1], 0)
    cache = [(tvm.runtime.from_dlpack(k), tvm.runtime.from_dlpack(v)) for k, v in zip(keys, values)]
    # What a call reads: each KV head's blocks up to the last visible position (its tail too).
    blocks = -(-a.context // block)
    visible = [tuple(x.view(np.uint8).reshape(kv_heads, capacity // block, -1)[:, :blocks] for x in kv)
               for kv in zip(keys, values)]
    read = sum(x.nbytes for kv in visible for x in kv)
    q = tvm.runtime.tensor(rng.standard_normal((1, heads, 1, head_dim)).astype(np.float32))
    out = tvm.runtime.tensor(np.zeros((1, 1, heads, head_dim), np.float32))
    scores = tvm.runtime.tensor(np.zeros((1, heads, 1, capacity), np.float32))
    other = np.ones(a.evict_mb << 20, np.uint8)

    def kernel(evict: bool) -> float:
        if not evict:
            attend(q, *cache[0], a.context - 1, out, scores)  # brings the layer in
        total = 0.0
        for k, v in cache if evict else [cache[0]] * layers:
            if evict:
                other.max()
            t = time.perf_counter()
            attend(q, k, v, a.context - 1, out, scores)
            total += time.perf_counter() - t
        return total

    def plain_read() -> float:
        total = 0.0
        for k, v in visible:
            other.max()
            t = time.perf_counter()
            k.max()
            v.max()
            total += time.perf_counter() - t
        return total

    kernel(True)  # first calls: page faults and code loads
    times = {"kernel, cold": [], "read, cold": [], "kernel, warm": []}  # the read: one thread (NumPy)
    for r in range(a.rounds):
        times["kernel, cold"].append(kernel(True))
        times["read, cold"].append(plain_read())
        times["kernel, warm"].append(kernel(False))
        print(f"bench_attention: round {r + 1}/{a.rounds}", file=sys.stderr, end="\r")
    bandwidth = read_bandwidth(PROBE_MB, a.threads)
    print(f"\n{a.shape} attention, {a.kv_dtype} cache, {a.context} positions, {layers} layers, {a.threads} thread(s): "
          f"{read / 1e6:.1f} MB of keys and values a token ({info.kv_position_bytes} bytes a position over the layers; "
          f"{DTYPE_BYTES[a.kv_dtype]}-byte elements{', with a float32 scale a position and head' if a.kv_dtype == 'int8' else ''}); "
          f"medians of {a.rounds} rounds")
    print(f"  {'':14} {'ms':>7} {'GB/s':>6}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"  {name:14} {ms:7.3f} {read / ms / 1e6:6.1f}" + ("   (one thread)" if name == "read, cold" and a.threads > 1 else ""))
    print(f"  {'probe floor':14} {read / bandwidth * 1e3:7.3f} {bandwidth / 1e9:6.1f}   (one {PROBE_MB} MB stream)")


if __name__ == "__main__":
    main()
