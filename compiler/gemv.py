"""Hand-scheduled CPU kernels for x @ W with W stored quantized in the (K, N) kernel layout.

At decode every matmul is a GEMV: each weight is used once, so the cost is what it takes to
turn stored bytes into fp32 products. The TE form (quant_kernels.py's `_matmul_te`) dequantizes every
weight completely inside the reduction: load and convert the zero point and scale, subtract,
multiply, then the product; ~5 vector operations per 8 weights, about 5 G weights/s on a
Xeon core and far from the memory bound. Here the affine part is factored out of the reduction:

  int4   y[j] = sum_g scale[g, j] * (sum_{k in g} x[k] * q[k, j]  -  zero[g, j] * sum_{k in g} x[k])
  int8   y[j] = scale[j] * sum_k x[k] * q[k, j]
  fp32/fp16/bf16 y[j] = sum_k x[k] * w[k, j]

so the inner loop is: load a row of stored bytes for LANES columns, unpack the two nibbles (int4),
convert, multiply-add; one pass per byte row serves two values of k. LANES columns give
LANES / 8 independent AVX2 accumulators (4 at 32), enough to hide the FMA latency. Columns
are split across threads (`parallel`), rows of x loop inside, so a prefill re-reads each tile
of weights from cache rather than memory (two rows at a time where the registers hold both:
ROW_BLOCK, float_rows_together).

On CPUs with 4-byte integer dot products (x86 AVX512-VNNI: `vpdpbusd`, 64 byte products per
instruction) int8 and int4 weights take the integer path llama.cpp takes (its q8_0 activations):
x is quantized to int8 per block of 32 inputs (`ACT_BLOCK`, one fp32 scale each) once per call,
then each block of a column is one exact int32 sum:

  int4   y[j] = sum_b scale[g(b), j] * d[b] * (isum_b[j] - zero[g(b), j] * xsum_b)
  int8   y[j] = scale[j] * sum_b d[b] * (usum_b[j] - 128 * xsum_b)   (usum: weights read as q + 128)

(symmetric int4, quant.py: zero = 8 everywhere, a constant; no zero-point load or widening per
block: GraniteMoE's int4 resident layer 387 -> 371 us a call at 1 thread before the 5% fewer bytes)

Weights are stored "dot-interleaved" for it (quant.py, `Scheme.dot`): in a tile, the 4 bytes of a
column for 4 consecutive inputs lie together, which is the operand `vpdpbusd` wants. The cold
1024x512 int4 expert matrix runs in 45 us against 82 us for the fp32-product kernel (hot: 7.7 vs
22.7 us); the price is the activations' rounding (relative error ~0.6% of the largest output on
random data), the same as llama.cpp's.

A resident MoE layer (every expert in one pool, artifact.MoELayer.resident_function) runs on
that path as one kernel, `resident_layer`: composed of each expert's GEMVs and elementwise ops,
a GraniteMoE-shaped int4 layer (k = 8 of 32 experts, 1024 x 512) was ~40 kernel calls and as many
thread-pool launches, and took 525 us cold with 2 threads, no faster than with 1; as one kernel
with two parallel loops, 310 us with 2 threads (470 us with 1).

These kernels are complete schedules (`tirx.is_scheduled`): dlight and the tuner leave them
alone. They read the tiled storage of quant.py (a tile = `lanes` output columns, stored as one
contiguous block); weights whose widths no tile divides, and GPU targets, keep the plain
layout and the TE form. dense_weights.py pads the LM head to a tile.
"""

from __future__ import annotations

import functools
import math

from tvm import tirx
from tvm.script import tirx as T

from moetvm.artifact import DTYPE_BYTES, SLOT_ALIGN

from .attention import STACK, dot4, prefetch_line, vector_exp
from .quant import FLOAT_DTYPES, SYMMETRIC_ZERO, Scheme, scale_dtype

LANES = 64
ACT_BLOCK = 32  # inputs sharing one activation scale on the integer-dot path
# The integer-dot kernels prefetch the weight bytes this far ahead (software prefetch, one per
# cache line read). The hardware prefetcher alone kept too few lines in flight when another core
# competed for memory: the GraniteMoE int4 resident layer (1 thread, the other core busy) ran in
# 447-580 us without, 344-434 with 4 KB (8 KB about the same; 0.5-1 KB slower or no better).
PREFETCH_BYTES = 4096
# Into L2, not L1 (prefetcht2): weights are read once, and a prefetch into L1 holds one of its few
# miss buffers until the line arrives, which capped the lines in flight. GraniteMoE int4 decode, 1
# thread, AMD Zen 4 (29.6 GB/s): 20.5-20.9 ms/token with prefetcht0, 16.4-16.7 with prefetcht2
# (prefetcht1 16.3-17.2; distances of 0-16 KB with prefetcht0 made no difference).
PREFETCH_LOCALITY = 1
# Per-tile sums live on the stack (attention.STACK): in "local" scope every vpdpbusd result was
# stored back to a heap workspace. 1024x1024 GEMV, L2-hot, 1 thread: int4 18.3 us with "local",
# 10.8 with "global", int8 19.7 and 14.9; GraniteMoE's int8 LM head in decode: 2.55-2.93 ms a
# token, 1.59-2.04 (its 50 MB read: 1.6-2.0 ms).
# Except, in the resident layers, the sums their inner loops update: the integer layer's two int32
# chains (_accumulate_tile) and the float layer's accumulators. In decode (GraniteMoE int4, 1
# thread, 3 interleaved runs) the int4 layer took 374-402 us with its chains in a workspace,
# 412-457 us in registers; alone and cold, 330 us either way (the cause is not isolated: this VM
# has no hardware counters). The fp32 layer: 2.03-2.18 ms against 2.21.
RESIDENT_PARTIALS = "local"
# The integer resident layer's (expert, d_ff tile) pairs run in this many parallel chunks (at most;
# a multiple of 2 and 4 threads' tasks), each declaring the RESIDENT_PARTIALS chains once: declared
# per pair they were 6,144 of the 7,370 workspace allocations (and frees) of a GraniteMoE int4 token,
# time in TVM's runtime outside the kernels; 1,995 a token with chunks (counted by wrapping
# TVMBackendAllocWorkspace). Decode speed the same within the noise.
RESIDENT_CHUNKS = 16
# Rows of x a GEMV runs together (a prefill's; a decode token has one row and takes the
# single-row path as before): each weight operand is loaded and converted (or unpacked) once for
# both. One row at a time, the unpacking (and, shift, and) outnumbered the vpdpbusd it fed.
# GraniteMoE's expert (1024 x 512), 1 thread, a different expert each call, us a row at 32 rows:
# integer dots int4s 21.1 -> 16.4, int8 28.5 -> 20.4 (a 1024-token int4s prefill 7.3 -> 6.1 s);
# fp32 products on AVX-512 fp32 59.6 -> 47.5 (where they pair: float_rows_together). Four rows
# (integer dots): 1.25x slower than one, their sums (4 x 64 lanes, 1 KB) past TVM's stack limit
# for a kernel's buffers (attention.STACK), so in a heap workspace; three: 1.6-1.9x slower (not
# looked into).
ROW_BLOCK = 2


# Weights may be views into a resident layer's pool (artifact.MoELayer.resident_function), which
# start at a multiple of SLOT_ALIGN bytes, not at 0: each weight buffer takes an element offset
# of that granularity (the data stays 64-byte aligned, so the vector loads are unchanged).
_OFFSET = {dtype: SLOT_ALIGN // DTYPE_BYTES[dtype] for dtype in ("uint8", "int8", "float16", "bfloat16", "float32")}


# A kernel attribute: the kernel's last parameter is its output (rows, n), each element of which
# it stores once and never reads (lowering.with_residual relies on it, rewriting each store).
STORES_OUTPUT_ONCE = "moetvm.stores_output_once"


def lanes_for(*dims: int) -> int | None:
    """The tile (vector width) for weights with these output widths, or None when no
    hand-scheduled kernel fits them all."""
    return next((lanes for lanes in (LANES, 32, 16) if all(n % lanes == 0 for n in dims)), None)


def dot_fits(s: Scheme, *k_dims: int) -> bool:
    """Whether weights at `s` with these input sizes can take the integer-dot path."""
    blocks_fit = all(k % ACT_BLOCK == 0 for k in k_dims)
    return blocks_fit and (s.name == "int8" or (s.name == "int4" and s.group_size % ACT_BLOCK == 0))


def matmul(k_dim: int, n_dim: int, s: Scheme, parts: tuple[int, ...] = ()) -> tirx.PrimFunc:
    """(x (rows, K) f32, *stored weights) -> out (rows, N) f32, for the tiled stored form of `s`
    (quant.py: each (rows, N) tensor as (N / tile, rows, tile)). parts: widths (whole tiles, summing
    to N) of the outputs that one stacked weight's columns go to (rows, part) each, in order,
    instead of one output."""
    if parts:
        return _split_output(matmul(k_dim, n_dim, s), parts, s.tile)
    lanes = s.tile
    assert lanes and n_dim % lanes == 0, (s, n_dim)
    tiles = n_dim // lanes
    if s.dot:
        assert dot_fits(s, k_dim) and lanes % 16 == 0, (s, k_dim)
        kernel = _int4_dot(k_dim, n_dim, s.group_size, lanes, tiles, s.vnni, s.symmetric) if s.name == "int4" \
            else _int8_dot(k_dim, n_dim, lanes, tiles)
    elif s.name == "int4":
        kernel = _int4(k_dim, n_dim, s.group_size, lanes, tiles, s.symmetric, float_rows_together(s))
    elif s.name == "int8":
        kernel = _int8(k_dim, n_dim, lanes, tiles, float_rows_together(s))
    else:
        kernel = _float(k_dim, n_dim, FLOAT_DTYPES[s.name], lanes, tiles, float_rows_together(s))
    return kernel.with_attr(STORES_OUTPUT_ONCE, True)


class UnknownStatement(Exception):
    """A kernel holds a statement `map_stores` does not know how to walk."""


def map_stores(stmt: tirx.Stmt, rewrite, loops: tuple = ()) -> tirx.Stmt:
    """`stmt` with each BufferStore replaced by rewrite(store, its enclosing For loops, outermost
    first); raises UnknownStatement at a statement with a body that it does not know."""
    if isinstance(stmt, tirx.BufferStore):
        return rewrite(stmt, loops)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([map_stores(s, rewrite, loops) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, map_stores(stmt.body, rewrite, (*loops, stmt)),
                        stmt.thread_binding, stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.IfThenElse):
        return tirx.IfThenElse(stmt.condition, map_stores(stmt.then_case, rewrite, loops),
                               map_stores(stmt.else_case, rewrite, loops) if stmt.else_case is not None else None)
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, map_stores(stmt.body, rewrite, loops))
    if isinstance(stmt, tirx.While):
        return tirx.While(stmt.condition, map_stores(stmt.body, rewrite, loops))
    if hasattr(stmt, "body"):
        raise UnknownStatement(type(stmt).__name__)
    return stmt  # a leaf that stores nothing: an allocation, a binding, an evaluation


def _split_output(kernel: tirx.PrimFunc, parts: tuple[int, ...], lanes: int) -> tirx.PrimFunc:
    """A GEMV kernel (STORES_OUTPUT_ONCE, its columns split across threads by tile in its parallel
    loop) with its output (rows, N) as one output per part: each tile's store goes to the part
    holding its columns, chosen by the tile alone (parts are whole tiles), so the vector stores stay."""
    *inputs, out = kernel.params
    rows, n = out.shape
    assert sum(parts) == int(n) and all(p % lanes == 0 for p in parts), (parts, n, lanes)
    outs = [tirx.decl_buffer((rows, p), out.dtype, f"out{j}") for j, p in enumerate(parts)]
    starts = [sum(parts[:j]) for j in range(len(parts))]

    def rewrite(store, loops):
        if not store.buffer.same_as(out):
            return store
        (tile,) = [loop.loop_var for loop in loops if loop.kind == tirx.ForKind.PARALLEL]
        i, column = store.indices
        chosen = None
        for j in reversed(range(len(parts))):
            part = tirx.BufferStore(outs[j], store.value, [i, column - tirx.const(starts[j], str(column.ty))])
            chosen = part if chosen is None else \
                tirx.IfThenElse(tile < tirx.const((starts[j] + parts[j]) // lanes, str(tile.ty)), part, chosen)
        return chosen

    return tirx.PrimFunc([*inputs, *outs], map_stores(kernel.body, rewrite), kernel.ret_type,
                         kernel.attrs).without_attr(STORES_OUTPUT_ONCE)


def float_rows_together(s: Scheme) -> int:
    """Rows the fp32-product kernels run together at `s`: ROW_BLOCK where the CPU has AVX-512's
    32 registers of 64 bytes (Scheme.vnni: AVX512-VNNI's CPUs), one elsewhere. Two rows' sums
    (2 x 64 fp32) take all 16 AVX2 registers (or all 32 of NEON's 16-byte ones, the A72) and
    spill: the fp32 expert built for AVX2 (haswell), run here, 72.8 -> 104.5 us a row at 32 rows.
    The integer-dot kernels' pairs gain there too (AVX2 int4s 38.5 -> 33.8): they always pair."""
    return ROW_BLOCK if s.vnni else 1


@T.macro
def _row_blocks(rows, tiles, together, rows_kernel, *args):
    """Per tile (split across threads), rows_kernel(tile, first row, count, *args) over the rows in
    blocks of `together`, then the rest one at a time."""
    for tile in T.parallel(tiles):
        if together == 1:
            for i in T.serial(rows):
                rows_kernel(tile, i, 1, *args)
        else:
            for ib in T.serial(rows // together):
                rows_kernel(tile, ib * together, together, *args)
            for i in T.serial(rows - rows // together * together):
                rows_kernel(tile, rows // together * together + i, 1, *args)


@T.macro
def _int4_rows(tile, first, count, x, q, scale, zero_of, out, lanes, group, groups, pairs):
    """Rows first..first+count of one tile of the int4 GEMV both int4 formats share; zero_of(tile,
    g, l) -> the zero point (a stored one, or 8)."""
    acc = T.decl_buffer((count * lanes,), "float32", scope=STACK)
    part = T.decl_buffer((count * lanes,), "float32", scope=STACK)
    x_sum = T.decl_buffer((count,), "float32", scope=STACK)
    for l in T.vectorized(count * lanes):
        acc[l] = T.float32(0)
    for g in T.serial(groups):
        for rr in T.unroll(count):
            x_sum[rr] = T.float32(0)
        for l in T.vectorized(count * lanes):
            part[l] = T.float32(0)
        for kk in T.serial(pairs):
            for rr in T.unroll(count):
                for l in T.vectorized(lanes):
                    part[rr * lanes + l] = part[rr * lanes + l] + x[first + rr, g * group + kk * 2] * T.Cast(
                        "float32", T.bitwise_and(q[tile, g * pairs + kk, l], T.uint8(15))) \
                        + x[first + rr, g * group + kk * 2 + 1] * T.Cast(
                        "float32", T.shift_right(q[tile, g * pairs + kk, l], T.uint8(4)))
                x_sum[rr] = x_sum[rr] + x[first + rr, g * group + kk * 2] + x[first + rr, g * group + kk * 2 + 1]
        for rr in T.unroll(count):
            for l in T.vectorized(lanes):
                acc[rr * lanes + l] = acc[rr * lanes + l] + T.Cast("float32", scale[tile, g, l]) * (
                    part[rr * lanes + l] - T.Cast("float32", zero_of(tile, g, l)) * x_sum[rr])
    for rr in T.unroll(count):
        for l in T.vectorized(lanes):
            out[first + rr, tile * lanes + l] = acc[rr * lanes + l]


@T.macro
def _float_rows(tile, first, count, x, w, out, k_dim, lanes, scale_of):
    """Rows first..first+count of one tile of the GEMV with fp32 products of stored values w
    (float, or int8 times scale_of(tile, l) per column; None: no scale)."""
    acc = T.decl_buffer((count * lanes,), "float32", scope=STACK)
    for l in T.vectorized(count * lanes):
        acc[l] = T.float32(0)
    for k in T.serial(k_dim):
        for rr in T.unroll(count):
            for l in T.vectorized(lanes):
                acc[rr * lanes + l] = acc[rr * lanes + l] + x[first + rr, k] * T.Cast("float32", w[tile, k, l])
    for rr in T.unroll(count):
        for l in T.vectorized(lanes):
            out[first + rr, tile * lanes + l] = acc[rr * lanes + l] if scale_of is None else \
                acc[rr * lanes + l] * scale_of(tile, l)


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def _int4(k_dim: int, n_dim: int, group: int, lanes: int, tiles: int, symmetric: bool, together: int) -> tirx.PrimFunc:
    groups, pairs = k_dim // group, group // 2
    if symmetric:
        @T.prim_func(private=True)
        def int4s_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, k_dim), "float32")
            q = T.match_buffer(q_h, (tiles, k_dim // 2, lanes), "uint8", offset_factor=_OFFSET["uint8"])
            scale = T.match_buffer(scale_h, (tiles, groups, lanes), "float16", offset_factor=_OFFSET["float16"])
            out = T.match_buffer(out_h, (rows, n_dim), "float32")
            _row_blocks(rows, tiles, together, _int4_rows, x, q, scale, lambda tile, g, l: T.uint8(SYMMETRIC_ZERO), out,
                        lanes, group, groups, pairs)

        return int4s_matmul

    @T.prim_func(private=True)
    def int4_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, zero_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim // 2, lanes), "uint8", offset_factor=_OFFSET["uint8"])
        scale = T.match_buffer(scale_h, (tiles, groups, lanes), "float16", offset_factor=_OFFSET["float16"])
        zero = T.match_buffer(zero_h, (tiles, groups, lanes), "uint8", offset_factor=_OFFSET["uint8"])
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        _row_blocks(rows, tiles, together, _int4_rows, x, q, scale, lambda tile, g, l: zero[tile, g, l], out, lanes,
                    group, groups, pairs)

    return int4_matmul


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def _int8(k_dim: int, n_dim: int, lanes: int, tiles: int, together: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def int8_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim, lanes), "int8", offset_factor=_OFFSET["int8"])
        scale = T.match_buffer(scale_h, (n_dim,), "float32", offset_factor=_OFFSET["float32"])
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        _row_blocks(rows, tiles, together, _float_rows, x, q, out, k_dim, lanes,
                    lambda tile, l: scale[tile * lanes + l])

    return int8_matmul


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def _float(k_dim: int, n_dim: int, dtype: str, lanes: int, tiles: int, together: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def float_matmul(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        w = T.match_buffer(w_h, (tiles, k_dim, lanes), dtype, offset_factor=_OFFSET[dtype])
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        _row_blocks(rows, tiles, together, _float_rows, x, w, out, k_dim, lanes, None)

    return float_matmul


@T.macro
def _quantize_activations(x, xq, xd, xs, rows, blocks):
    """x (rows, K) f32 -> xq int8, per block of ACT_BLOCK inputs its scale xd and the sum xs of xq."""
    for i, b in T.grid(rows, blocks):
        amax = T.decl_buffer((1,), "float32", scope=STACK)
        inv = T.decl_buffer((1,), "float32", scope=STACK)
        total = T.decl_buffer((1,), "int32", scope=STACK)
        amax[0] = T.float32(0)
        for kk in T.serial(ACT_BLOCK):
            amax[0] = T.max(amax[0], T.fabs(x[i, b * ACT_BLOCK + kk]))
        inv[0] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
        for kk in T.vectorized(ACT_BLOCK):
            xq[i, b * ACT_BLOCK + kk] = T.Cast("int8", T.nearbyint(x[i, b * ACT_BLOCK + kk] * inv[0]))
        total[0] = 0
        for kk in T.serial(ACT_BLOCK):
            total[0] = total[0] + T.Cast("int32", xq[i, b * ACT_BLOCK + kk])
        xd[i, b] = amax[0] / T.float32(127)
        xs[i, b] = total[0]


def _dot(acc, at, weights, activations):
    """acc[at : at+16] += 4-byte dot products of weights (16 x 4 bytes, unsigned) and the same 4
    activation bytes for every column (signed)."""
    return dot4(acc[T.ramp(at, 1, 16)], T.reinterpret("int8x64", weights), T.reinterpret("int8x64", T.broadcast(activations, 16)))


def _dot_avx2(acc, at, weights, activations):
    """_dot in AVX2 instructions, for CPUs without VNNI: per 32-byte half, vpmaddubsw (unsigned x
    signed bytes, adjacent pairs summed into int16), then vpmaddwd by ones (pairs into int32).
    Exact only while a pair of products fits int16: int4's nibbles (<= 15) times int8 activations
    do (<= 3810), int8's bytes (<= 255) would saturate, so only int4 takes it (Scheme.vnni)."""
    w = T.reinterpret("int8x64", weights)
    a = T.reinterpret("int8x64", T.broadcast(activations, 16))
    sums = []
    for half in (0, 1):
        lanes = [T.int32(32 * half + i) for i in range(32)]
        pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.Shuffle([w], lanes), T.Shuffle([a], lanes))
        sums.append(T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), 16)))
    return acc[T.ramp(at, 1, 16)] + T.Shuffle(sums, [T.int32(i) for i in range(16)])


def _dot_for(vnni: bool):
    """The 4-byte dot product of a CPU with AVX512-VNNI or without it (Scheme.vnni)."""
    return _dot if vnni else _dot_avx2


@T.macro
def _accumulate_tile_in(acc, first, second, xq, xd, xs, row, weights, tile, k_dim, lanes, operand, block_value, ahead, dot):
    """_accumulate_tile with its two chains given (buffers of `lanes` int32), for a caller that
    declares them once for many tiles."""
    for b in T.serial(k_dim // ACT_BLOCK):
        for l in T.vectorized(lanes):
            first[l] = 0
            second[l] = 0
        for r in T.serial(ACT_BLOCK // 8):
            for v in T.unroll(lanes // 16):
                T.evaluate(ahead(weights, tile, b * (ACT_BLOCK // 8) + r, v, 0))
                T.evaluate(ahead(weights, tile, b * (ACT_BLOCK // 8) + r, v, 1))
                first[T.ramp(v * 16, 1, 16)] = dot(
                    first, v * 16, operand(weights, tile, b * (ACT_BLOCK // 8) + r, v, 0),
                    T.reinterpret("int32", xq[row, T.ramp(b * ACT_BLOCK + r * 8, 1, 4)]))
                second[T.ramp(v * 16, 1, 16)] = dot(
                    second, v * 16, operand(weights, tile, b * (ACT_BLOCK // 8) + r, v, 1),
                    T.reinterpret("int32", xq[row, T.ramp(b * ACT_BLOCK + r * 8 + 4, 1, 4)]))
        for l in T.vectorized(lanes):
            acc[l] = acc[l] + block_value(weights, tile, b, l, first[l] + second[l], xd[row, b], xs[row, b])


@T.macro
def _accumulate_tile(acc, xq, xd, xs, row, weights, tile, k_dim, lanes, operand, block_value, ahead, dot, scope=STACK):
    """acc[l] += column l of this tile dotted with activation row `row` (quantized: xq, its
    block scales xd and sums xs): per block of ACT_BLOCK inputs, two int32 chains (inputs
    8s..8s+3 and 8s+4..8s+7 of each step s of 8) folded into fp32. The stored form enters
    through operand(weights, tile, step, v, half) -> the 64 unsigned bytes (int32x16) of columns
    16v..16v+15 for that half of the step, block_value(weights, tile, b, l, isum, scale, sum) ->
    block b's fp32 contribution to column l, and ahead(weights, tile, step, v, half) -> the
    prefetch of what that operand reads PREFETCH_BYTES later (or a no-op); dot: _dot_for(scheme.vnni);
    scope: where the two chains live (STACK, or RESIDENT_PARTIALS)."""
    first = T.decl_buffer((lanes,), "int32", scope=scope)  # two halves: two chains
    second = T.decl_buffer((lanes,), "int32", scope=scope)
    _accumulate_tile_in(acc, first, second, xq, xd, xs, row, weights, tile, k_dim, lanes, operand, block_value, ahead, dot)


@T.macro
def _accumulate_tile_rows(acc, xq, xd, xs, first_row, count, weights, tile, k_dim, lanes, operand, block_value, ahead,
                          dot):
    """_accumulate_tile for `count` rows at once (acc: count x lanes, row-major): each operand is
    loaded and unpacked once for all of them, and each row keeps one int32 chain per block (count
    x lanes/16 independent chains: enough to keep vpdpbusd busy). The sums are the single-row
    path's, exactly: int32 in the blocks, the same fp32 order across them."""
    chain = T.decl_buffer((count * lanes,), "int32", scope=STACK)
    for b in T.serial(k_dim // ACT_BLOCK):
        for l in T.vectorized(count * lanes):
            chain[l] = 0
        for r in T.serial(ACT_BLOCK // 8):
            for v in T.unroll(lanes // 16):
                T.evaluate(ahead(weights, tile, b * (ACT_BLOCK // 8) + r, v, 0))
                T.evaluate(ahead(weights, tile, b * (ACT_BLOCK // 8) + r, v, 1))
                for rr in T.unroll(count):  # (LLVM loads and unpacks each operand once for all rows)
                    chain[T.ramp(rr * lanes + v * 16, 1, 16)] = dot(
                        chain, rr * lanes + v * 16, operand(weights, tile, b * (ACT_BLOCK // 8) + r, v, 0),
                        T.reinterpret("int32", xq[first_row + rr, T.ramp(b * ACT_BLOCK + r * 8, 1, 4)]))
                    chain[T.ramp(rr * lanes + v * 16, 1, 16)] = dot(
                        chain, rr * lanes + v * 16, operand(weights, tile, b * (ACT_BLOCK // 8) + r, v, 1),
                        T.reinterpret("int32", xq[first_row + rr, T.ramp(b * ACT_BLOCK + r * 8 + 4, 1, 4)]))
        for rr in T.unroll(count):
            for l in T.vectorized(lanes):
                acc[rr * lanes + l] = acc[rr * lanes + l] + block_value(
                    weights, tile, b, l, chain[rr * lanes + l], xd[first_row + rr, b], xs[first_row + rr, b])


@T.macro
def _integer_dot_rows(tile, first, count, xq, xd, xs, out, weights, k_dim, lanes, operand, block_value, finish, ahead,
                      dot):
    """Rows first..first+count of one tile of the integer-dot GEMV; one row (a decode token's)
    with its two chains (_accumulate_tile), more with one chain each (_accumulate_tile_rows)."""
    acc = T.decl_buffer((count * lanes,), "float32", scope=STACK)
    for l in T.vectorized(count * lanes):
        acc[l] = T.float32(0)
    if count == 1:
        _accumulate_tile(acc, xq, xd, xs, first, weights, tile, k_dim, lanes, operand, block_value, ahead, dot)
    else:
        _accumulate_tile_rows(acc, xq, xd, xs, first, count, weights, tile, k_dim, lanes, operand, block_value, ahead,
                              dot)
    for rr in T.unroll(count):
        for l in T.vectorized(lanes):
            out[first + rr, tile * lanes + l] = finish(weights, tile, l, acc[rr * lanes + l])


@T.macro
def _integer_dot_tiles(x, out, weights, rows, k_dim, lanes, tiles, operand, block_value, finish, ahead, dot):
    """The integer-dot GEMV both precisions share: quantize x, then the tiles' rows
    (_integer_dot_rows), finish(weights, tile, l, acc) -> the output."""
    xq = T.alloc_buffer((rows, k_dim), "int8")
    xd = T.alloc_buffer((rows, k_dim // ACT_BLOCK), "float32")
    xs = T.alloc_buffer((rows, k_dim // ACT_BLOCK), "int32")
    _quantize_activations(x, xq, xd, xs, rows, k_dim // ACT_BLOCK)
    _row_blocks(rows, tiles, ROW_BLOCK, _integer_dot_rows, xq, xd, xs, out, weights, k_dim, lanes, operand, block_value,
                finish, ahead, dot)


def _int4_terms(q_row, q_line, scale_at, zero_at, group: int, lanes: int):
    """(operand, block_value, finish, ahead) of dot-interleaved int4 weights, read through
    q_row(weights, tile, stored row, v) -> bytes 64v..64v+63 of that row, q_line(weights, tile,
    stored row, v) -> their address (rows past the tile's run on into the next) and
    scale_at / zero_at(weights, tile, group, l); zero_at None: symmetric, every zero point 8
    (a multiply by a constant: no zero-point load and widening per block)."""
    rows_ahead = PREFETCH_BYTES // (lanes * 4)
    blocks_per_group = group // ACT_BLOCK
    nibbles = T.broadcast(T.int32(0x0F0F0F0F), 16)

    def operand(w, tile, step, v, half):  # a stored row is one step: low nibbles, then high
        q = T.reinterpret("int32x16", q_row(w, tile, step, v))
        return T.bitwise_and(T.shift_right(q, T.broadcast(T.int32(4), 16)) if half else q, nibbles)

    def block_value(w, tile, b, l, isum, d, xsum):
        g = b // blocks_per_group
        zero = T.int32(SYMMETRIC_ZERO) if zero_at is None else T.Cast("int32", zero_at(w, tile, g, l))
        return T.Cast("float32", scale_at(w, tile, g, l)) * d * T.Cast("float32", isum - zero * xsum)

    def finish(w, tile, l, acc):
        return acc

    def ahead(w, tile, step, v, half):  # both halves read the same row
        return T.int32(0) if half else prefetch_line(q_line(w, tile, step + rows_ahead, v), PREFETCH_LOCALITY)

    return operand, block_value, finish, ahead


def _int8_terms(q_row, q_line, scale_at, lanes: int):
    """(operand, block_value, finish, ahead) of dot-interleaved int8 weights, read through
    q_row / q_line as for int4 and scale_at(weights, tile, l)."""
    rows_ahead = PREFETCH_BYTES // (lanes * 4)
    sign_bits = T.broadcast(T.int32(-0x7F7F7F80), 16)  # 0x80808080: q ^ 0x80 is q + 128 read unsigned

    def operand(w, tile, step, v, half):  # a stored row is half a step
        return T.bitwise_xor(T.reinterpret("int32x16", q_row(w, tile, step * 2 + half, v)), sign_bits)

    def block_value(w, tile, b, l, usum, d, xsum):
        return d * T.Cast("float32", usum - 128 * xsum)

    def finish(w, tile, l, acc):
        return acc * scale_at(w, tile, l)

    def ahead(w, tile, step, v, half):
        return prefetch_line(q_line(w, tile, step * 2 + half + rows_ahead, v), PREFETCH_LOCALITY)

    return operand, block_value, finish, ahead


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def _int4_dot(k_dim: int, n_dim: int, group: int, lanes: int, tiles: int, vnni: bool, symmetric: bool) -> tirx.PrimFunc:
    groups = k_dim // group
    operand, block_value, finish, ahead = _int4_terms(lambda w, tile, row, v: w[0][tile, row, T.ramp(v * 64, 1, 64)],
                                                      lambda w, tile, row, v: T.address_of(w[0][tile, row, v * 64]),
                                                      lambda w, tile, g, l: w[1][tile, g, l],
                                                      None if symmetric else (lambda w, tile, g, l: w[2][tile, g, l]),
                                                      group, lanes)
    if symmetric:
        @T.prim_func(private=True)
        def int4s_dot_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, k_dim), "float32")
            q = T.match_buffer(q_h, (tiles, k_dim // 8, lanes * 4), "uint8", offset_factor=_OFFSET["uint8"])
            scale = T.match_buffer(scale_h, (tiles, groups, lanes), "float16", offset_factor=_OFFSET["float16"])
            out = T.match_buffer(out_h, (rows, n_dim), "float32")
            _integer_dot_tiles(x, out, (q, scale), rows, k_dim, lanes, tiles, operand, block_value, finish, ahead,
                               _dot_for(vnni))

        return int4s_dot_matmul

    @T.prim_func(private=True)
    def int4_dot_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, zero_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim // 8, lanes * 4), "uint8", offset_factor=_OFFSET["uint8"])
        scale = T.match_buffer(scale_h, (tiles, groups, lanes), "float16", offset_factor=_OFFSET["float16"])
        zero = T.match_buffer(zero_h, (tiles, groups, lanes), "uint8", offset_factor=_OFFSET["uint8"])
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        _integer_dot_tiles(x, out, (q, scale, zero), rows, k_dim, lanes, tiles, operand, block_value, finish, ahead,
                           _dot_for(vnni))

    return int4_dot_matmul


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def _int8_dot(k_dim: int, n_dim: int, lanes: int, tiles: int) -> tirx.PrimFunc:
    operand, block_value, finish, ahead = _int8_terms(lambda w, tile, row, v: w[0][tile, row, T.ramp(v * 64, 1, 64)],
                                                      lambda w, tile, row, v: T.address_of(w[0][tile, row, v * 64]),
                                                      lambda w, tile, l: w[1][tile * lanes + l], lanes)

    @T.prim_func(private=True)
    def int8_dot_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim // 4, lanes * 4), "int8", offset_factor=_OFFSET["int8"])
        scale = T.match_buffer(scale_h, (n_dim,), "float32", offset_factor=_OFFSET["float32"])
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        _integer_dot_tiles(x, out, (q, scale), rows, k_dim, lanes, tiles, operand, block_value, finish, ahead, _dot)

    return int8_dot_matmul


def _slot_start(chosen, e, n_experts: int, slot):
    """Where chosen expert `e`'s slot starts in a resident pool (in units of `slot`'s size): an id
    outside [0, E) is clamped, so a resident kernel never reads outside its pool."""
    return T.min(T.max(chosen[e], T.int64(0)), T.int64(n_experts - 1)) * slot


def _silu_times(gate, exp_neg_abs, up):
    """silu(gate) * up from e^-|gate| (the exponent never positive: no overflow for large |gate|)."""
    return gate * T.if_then_else(gate >= T.float32(0), T.float32(1) / (T.float32(1) + exp_neg_abs),
                                 exp_neg_abs / (T.float32(1) + exp_neg_abs)) * up


SILU_LANES = 16


def silu_fits(width: int) -> bool:
    """Whether silu_multiply takes rows of this width."""
    return width % SILU_LANES == 0


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def silu_multiply(width: int) -> tirx.PrimFunc:
    """(gate (rows, width), up (rows, width)) -> silu(gate) * up (rows, width) f32, a SwiGLU
    expert's middle on CPUs, with the exponential as vector arithmetic (attention.vector_exp):
    TVM lowers relax.op.nn.silu to one libm expf call per element, 1-2% of a prefill."""
    assert silu_fits(width), width

    @T.prim_func(private=True)
    def silu_multiply(gate_h: T.handle, up_h: T.handle, out_h: T.handle):
        # Opaque: elementwise, FuseOps would merge it into the GEMVs before it, whose schedules are whole.
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        gate = T.match_buffer(gate_h, (rows, width), "float32")
        up = T.match_buffer(up_h, (rows, width), "float32")
        out = T.match_buffer(out_h, (rows, width), "float32")
        for i, j in T.grid(rows, width // SILU_LANES):
            for l in T.vectorized(SILU_LANES):
                out[i, j * SILU_LANES + l] = _silu_times(gate[i, j * SILU_LANES + l],
                                                         vector_exp(-T.fabs(gate[i, j * SILU_LANES + l])),
                                                         up[i, j * SILU_LANES + l])

    return silu_multiply


def fuses_resident_layer(s: Scheme) -> bool:
    """Whether a resident layer at `s` runs as one kernel (resident_layer) rather than as the
    composition of per-expert GEMVs: the integer-dot schemes, in tiles of whole activation blocks,
    and the float precisions in tiles."""
    return bool(s.tile) and (s.name in FLOAT_DTYPES or (s.dot and s.tile % ACT_BLOCK == 0))


def resident_view_dtype(s: Scheme) -> str:
    """The dtype the fused resident layer also reads its pool as: the scales of the integer
    schemes, the weights themselves of the float ones."""
    return FLOAT_DTYPES[s.name] if s.name in FLOAT_DTYPES else scale_dtype(s)


def resident_layer(d_model: int, d_ff: int, s: Scheme, n_experts: int, top_k: int, offsets: dict[str, int],
                   slot_bytes: int) -> tirx.PrimFunc:
    """A decode step's MoE layer in one kernel, its k experts read from the layer's pool:
    (x (1, d), gates (1, k), chosen (k,) int64, pool (E * slot_bytes,) uint8, the pool viewed as
    its scale dtype, out (1, d)) -> out = sum_i gates[i] * down_i(silu(x @ gate_i) * (x @ up_i)).

    Two parallel loops instead of one per GEMV and elementwise op of each expert: over (expert,
    d_ff tile) for gate and up, which also quantizes its tile of the hidden activations (a tile is
    whole activation blocks), then over d_model tiles, each summing its columns over the k
    experts. `offsets`: the byte offset in a slot of each stored tensor (expert_params' names).
    A chosen id outside [0, E) is clamped: the kernel never reads outside the pool."""
    assert fuses_resident_layer(s), s
    if s.name in FLOAT_DTYPES:
        kernel = _resident_float_layer(d_model, d_ff, FLOAT_DTYPES[s.name], s.tile, n_experts, top_k, offsets, slot_bytes)
    else:
        kernel = _resident_int_layer(d_model, d_ff, s, n_experts, top_k, offsets, slot_bytes)
    return kernel.with_attr(STORES_OUTPUT_ONCE, True)


def _resident_int_layer(d_model: int, d_ff: int, s: Scheme, n_experts: int, top_k: int, offsets: dict[str, int],
                        slot_bytes: int) -> tirx.PrimFunc:
    lanes, f32 = s.tile, "float32"
    scales_dtype = scale_dtype(s)
    scale_bytes = DTYPE_BYTES[scales_dtype]
    pool_bytes = n_experts * slot_bytes

    def terms(prefix: str, k_dim: int):
        rows = k_dim // s.interleave  # stored rows of a tile
        q, scale = offsets[prefix], offsets[prefix + ".scale"] // scale_bytes

        def q_row(w, tile, row, v):
            return w[0][T.ramp(w[2] + q + (tile * rows + row) * (lanes * 4) + v * 64, 1, 64)]

        def q_line(w, tile, row, v):
            return T.address_of(w[0][w[2] + q + (tile * rows + row) * (lanes * 4) + v * 64])

        if s.name == "int8":
            return _int8_terms(q_row, q_line, lambda w, tile, l: w[1][w[2] // scale_bytes + scale + tile * lanes + l], lanes)
        groups = k_dim // s.group_size
        zero = None if s.symmetric else offsets[prefix + ".zero"]
        return _int4_terms(q_row, q_line, lambda w, tile, g, l: w[1][w[2] // scale_bytes + scale + (tile * groups + g) * lanes + l],
                           None if s.symmetric else (lambda w, tile, g, l: w[0][w[2] + zero + (tile * groups + g) * lanes + l]),
                           s.group_size, lanes)

    gate_operand, gate_value, gate_finish, gate_ahead = terms("w_gate", d_model)
    up_operand, up_value, up_finish, up_ahead = terms("w_up", d_model)
    down_operand, down_value, down_finish, down_ahead = terms("w_down", d_ff)
    ff_tiles, d_tiles, blocks_per_tile = d_ff // lanes, d_model // lanes, lanes // ACT_BLOCK
    chunks = math.gcd(top_k * ff_tiles, RESIDENT_CHUNKS)
    per_chunk = top_k * ff_tiles // chunks
    dot = _dot_for(s.vnni)

    @T.prim_func(private=True)
    def resident_moe_layer(x_h: T.handle, gates_h: T.handle, chosen_h: T.handle, pool_h: T.handle,
                           scales_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (1, d_model), f32)
        gates = T.match_buffer(gates_h, (1, top_k), f32)
        chosen = T.match_buffer(chosen_h, (top_k,), "int64")
        pool = T.match_buffer(pool_h, (pool_bytes,), "uint8")
        scales = T.match_buffer(scales_h, (pool_bytes // scale_bytes,), scales_dtype)
        out = T.match_buffer(out_h, (1, d_model), f32)
        xq = T.alloc_buffer((1, d_model), "int8")
        xd = T.alloc_buffer((1, d_model // ACT_BLOCK), f32)
        xs = T.alloc_buffer((1, d_model // ACT_BLOCK), "int32")
        hq = T.alloc_buffer((top_k, d_ff), "int8")  # the hidden activations, quantized per expert
        hd = T.alloc_buffer((top_k, d_ff // ACT_BLOCK), f32)
        hs = T.alloc_buffer((top_k, d_ff // ACT_BLOCK), "int32")
        _quantize_activations(x, xq, xd, xs, 1, d_model // ACT_BLOCK)
        for chunk in T.parallel(T.int64(chunks)):
            # the chains, once per chunk of (expert, tile) pairs (RESIDENT_CHUNKS)
            first = T.decl_buffer((lanes,), "int32", scope=RESIDENT_PARTIALS)
            second = T.decl_buffer((lanes,), "int32", scope=RESIDENT_PARTIALS)
            for i in T.serial(T.int64(per_chunk)):
                e: T.let[T.int64] = (chunk * per_chunk + i) // ff_tiles
                tile: T.let[T.int64] = (chunk * per_chunk + i) % ff_tiles
                base: T.let[T.int64] = _slot_start(chosen, e, n_experts, slot_bytes)
                gate_acc = T.decl_buffer((lanes,), f32, scope=STACK)
                up_acc = T.decl_buffer((lanes,), f32, scope=STACK)
                h = T.decl_buffer((lanes,), f32, scope=STACK)
                amax = T.decl_buffer((1,), f32, scope=STACK)
                inv = T.decl_buffer((1,), f32, scope=STACK)
                total = T.decl_buffer((1,), "int32", scope=STACK)
                for l in T.vectorized(lanes):
                    gate_acc[l] = T.float32(0)
                    up_acc[l] = T.float32(0)
                _accumulate_tile_in(gate_acc, first, second, xq, xd, xs, 0, (pool, scales, base), tile, d_model, lanes,
                                    gate_operand, gate_value, gate_ahead, dot)
                _accumulate_tile_in(up_acc, first, second, xq, xd, xs, 0, (pool, scales, base), tile, d_model, lanes,
                                    up_operand, up_value, up_ahead, dot)
                for l in T.vectorized(lanes):  # h = silu(gate) * up, through buffers: in TVM 0.27 a let in a
                    # vectorised loop gave every lane one lane's value
                    gate_acc[l] = gate_finish((pool, scales, base), tile, l, gate_acc[l])
                    h[l] = vector_exp(T.float32(0) - T.fabs(gate_acc[l]))  # e^-|g|, within the polynomial's domain
                    h[l] = _silu_times(gate_acc[l], h[l], up_finish((pool, scales, base), tile, l, up_acc[l]))
                for hb in T.serial(blocks_per_tile):  # as _quantize_activations, per block of this tile
                    amax[0] = T.float32(0)
                    for kk in T.serial(ACT_BLOCK):
                        amax[0] = T.max(amax[0], T.fabs(h[hb * ACT_BLOCK + kk]))
                    inv[0] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                    for kk in T.vectorized(ACT_BLOCK):
                        hq[e, tile * lanes + hb * ACT_BLOCK + kk] = T.Cast("int8", T.nearbyint(h[hb * ACT_BLOCK + kk] * inv[0]))
                    total[0] = 0
                    for kk in T.serial(ACT_BLOCK):
                        total[0] = total[0] + T.Cast("int32", hq[e, tile * lanes + hb * ACT_BLOCK + kk])
                    hd[e, tile * blocks_per_tile + hb] = amax[0] / T.float32(127)
                    hs[e, tile * blocks_per_tile + hb] = total[0]
        for tile in T.parallel(T.int64(d_tiles)):
            acc = T.decl_buffer((lanes,), f32, scope=STACK)
            part = T.decl_buffer((lanes,), f32, scope=STACK)
            for l in T.vectorized(lanes):
                acc[l] = T.float32(0)
            for e in T.serial(T.int64(top_k)):
                if True:
                    base: T.let[T.int64] = _slot_start(chosen, e, n_experts, slot_bytes)
                    for l in T.vectorized(lanes):
                        part[l] = T.float32(0)
                    _accumulate_tile(part, hq, hd, hs, e, (pool, scales, base), tile, d_ff, lanes, down_operand, down_value,
                                     down_ahead, dot, RESIDENT_PARTIALS)
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + down_finish((pool, scales, base), tile, l, part[l]) * gates[0, e]
            for l in T.vectorized(lanes):
                out[0, tile * lanes + l] = acc[l]

    return resident_moe_layer


def _resident_float_layer(d_model: int, d_ff: int, dtype: str, lanes: int, n_experts: int, top_k: int,
                          offsets: dict[str, int], slot_bytes: int) -> tirx.PrimFunc:
    """resident_layer for weights stored as plain numbers (fp32/fp16/bf16 tiles, `_float`'s
    layout), read through `weights`, the pool viewed as their dtype. Measured on the OLMoE-style
    fp32 layer (k = 8 of 64 experts, 1024 x 512), the composition of each expert's GEMVs was ~40
    thread-pool launches per layer and no faster with a second thread."""
    size = DTYPE_BYTES[dtype]
    w_gate, w_up, w_down = (offsets[name] // size for name in ("w_gate", "w_up", "w_down"))
    slot, pool_bytes, f32 = slot_bytes // size, n_experts * slot_bytes, "float32"
    ff_tiles, d_tiles = d_ff // lanes, d_model // lanes

    @T.prim_func(private=True)
    def resident_float_moe_layer(x_h: T.handle, gates_h: T.handle, chosen_h: T.handle, pool_h: T.handle,
                                 weights_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (1, d_model), f32)
        gates = T.match_buffer(gates_h, (1, top_k), f32)
        chosen = T.match_buffer(chosen_h, (top_k,), "int64")
        pool = T.match_buffer(pool_h, (pool_bytes,), "uint8")  # noqa: F841 - read through `weights`
        weights = T.match_buffer(weights_h, (pool_bytes // size,), dtype)
        out = T.match_buffer(out_h, (1, d_model), f32)
        hidden = T.alloc_buffer((top_k, d_ff), f32)
        for et in T.parallel(T.int64(top_k * ff_tiles)):
            if True:
                e: T.let[T.int64] = et // ff_tiles
                tile: T.let[T.int64] = et % ff_tiles
                base: T.let[T.int64] = _slot_start(chosen, e, n_experts, slot)
                gate_acc = T.decl_buffer((lanes,), f32, scope=RESIDENT_PARTIALS)
                up_acc = T.decl_buffer((lanes,), f32, scope=RESIDENT_PARTIALS)
                h = T.decl_buffer((lanes,), f32, scope=STACK)
                for l in T.vectorized(lanes):
                    gate_acc[l] = T.float32(0)
                    up_acc[l] = T.float32(0)
                for k in T.serial(d_model):
                    for l in T.vectorized(lanes):
                        gate_acc[l] = gate_acc[l] + x[0, k] * T.Cast(f32, weights[base + w_gate + (tile * d_model + k) * lanes + l])
                        up_acc[l] = up_acc[l] + x[0, k] * T.Cast(f32, weights[base + w_up + (tile * d_model + k) * lanes + l])
                for l in T.vectorized(lanes):  # silu(gate) * up, as resident_layer computes it
                    h[l] = vector_exp(T.float32(0) - T.fabs(gate_acc[l]))
                    hidden[e, tile * lanes + l] = _silu_times(gate_acc[l], h[l], up_acc[l])
        for tile in T.parallel(T.int64(d_tiles)):
            acc = T.decl_buffer((lanes,), f32, scope=RESIDENT_PARTIALS)
            part = T.decl_buffer((lanes,), f32, scope=RESIDENT_PARTIALS)
            for l in T.vectorized(lanes):
                acc[l] = T.float32(0)
            for e in T.serial(T.int64(top_k)):
                if True:
                    base: T.let[T.int64] = _slot_start(chosen, e, n_experts, slot)
                    for l in T.vectorized(lanes):
                        part[l] = T.float32(0)
                    for k in T.serial(d_ff):
                        for l in T.vectorized(lanes):
                            part[l] = part[l] + hidden[e, k] * T.Cast(f32, weights[base + w_down + (tile * d_ff + k) * lanes + l])
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + part[l] * gates[0, e]
            for l in T.vectorized(lanes):
                out[0, tile * lanes + l] = acc[l]

    return resident_float_moe_layer
