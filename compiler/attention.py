"""Attention over an in-place KV cache: the kernels the traced model's attention becomes.

The runtime owns one key and one value buffer per layer, allocated for a capacity of positions
(grown by doubling) and passed to every step; a step writes its new keys and values at their
positions (`kv_append`, a `call_tir_inplace`) and attends over the first `past + seq` positions
(`cached_attention`). Nothing of size `context` is copied, concatenated or converted per token:
decode reads each cached key and value once.

Layouts, chosen for batch-1 decode on CPUs, in blocks of `block` positions (artifact
KVCacheLayout.block, the keys the kernel scores together: `key_block`; the capacity is a whole
number of blocks):
  keys    (batch, kv_heads, blocks, head_dim, block)  transposed within a block: the scores of 8
          consecutive keys for one query are 8 lanes of one vector, one broadcast-multiply-add per
          head_dim element, with no horizontal sums; and a block's keys are one contiguous run of
          memory, which the hardware prefetcher follows (transposed over the whole capacity, a
          block's keys were head_dim rows a capacity apart: too many strided streams for it).
  values  (batch, kv_heads, blocks, block, head_dim)  the output row accumulates `weight * V[j]`
          along head_dim, vectorised.
The cache dtype is float32, float16 (half the bytes per token) or int8 (a quarter, plus a
float32 scale per position and head: artifact.KVCacheLayout); products and sums stay fp32.
int8 keys and values are quantized per position (symmetric, round to nearest, scale = max|x| /
127) as they are appended; a key's scale multiplies its score, a value's its softmax weight.
Queries are grouped onto KV heads (GQA): head h reads KV head h // (heads // kv_heads).

On CPUs with 4-byte integer dot products (x86 AVX512-VNNI, `vpdpbusd`) an int8 cache is kept in
"dot order" (KVCacheLayout.dot), and both products are integer dots, as the int8 GEMVs are
(compiler/gemv.py): scores from the query quantized to int8 (one scale per head row) against
keys stored 4 dimensions to 4 bytes per position; the output from the softmax weights (times
each value row's scale) quantized to uint8 per block of positions against values stored 4
positions to 4 bytes per dimension. Converting each int8 to float32 (a shuffle-port extend, a
convert, a multiply-add: 12 cycles a position at 64 dimensions) had made the attention's
arithmetic as slow as its memory, and the two did not overlap: `dot_attention`.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from moetvm.artifact import KV_QUANTIZED, KV_SCALE_BYTES

LANES = 64  # keys scored together: independent accumulators (4 AVX512 / 8 AVX2 / 16 NEON
# registers), so the head_dim-long multiply-add chains overlap. With 8 (one AVX2 register) each
# block waited on one chain of head_dim dependent FMAs, and with exp() called per key the
# GraniteMoE int4 decode token at context 1024 took 1.26x its time at context 16.

_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693145751953125, 1.4286068203094172e-06


def vector_exp(x):
    """exp(x) for x <= 0 as vector arithmetic (no libm call per lane): x = n ln2 + r, |r| <=
    ln2/2, a degree-6 polynomial for e^r (relative error < 2e-7), times 2^n built in the
    exponent bits. Inputs below -87 give ~1e-38, as good as 0 after the softmax's division."""
    x = T.max(x, T.float32(-87.0))
    n = T.floor(x * T.float32(_LOG2E) + T.float32(0.5))
    r = x - n * T.float32(_LN2_HI) - n * T.float32(_LN2_LO)
    poly = T.float32(1.0 / 720)
    for c in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        poly = poly * r + T.float32(c)
    return poly * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


# The scope of the CPU kernels' small scratch buffers (accumulators, running maxima): TVM 0.27's
# LowerTVMBuiltin keeps a CPU allocation under 1 KB on the stack only in "global" scope; a "local"
# one becomes a heap workspace (TVMBackendAllocWorkspace) that LLVM cannot prove apart from the
# kernel's inputs, so each update is stored back to memory. GraniteMoE int4 decode at context
# 1024, 1 thread (`moetvm run` p50, 2x3 interleaved rounds): 20.0-22.9 ms with "local", 18.1-19.8
# with "global". The GEMVs' figures: gemv.py.
STACK = "global"


def prefetch_line(address, locality: int = 3):
    """Software prefetch of the cache line at `address` (never faults, past the end included).
    locality: LLVM's, 3 = into every level (prefetcht0), 1 = the outer ones (prefetcht2)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, locality, 1)  # read, data


# Software prefetch distances. The hardware prefetcher restarts at every 4 KB page (a GraniteMoE
# fp16 key block is one page), so each page's first lines were waited for. Keys: the next key block,
# a line per head_dim row (none: 7.0 against 5.6 ms, 2 or 4 ahead: slower); values: 16 rows ahead
# (8, 32, 64: slower). Blocked and prefetched, the attention over 1024 cached positions (cold,
# huge pages, 1 thread) went from 5.96 to 4.55 ms at the GraniteMoE shape (fp16 cache; int8 4.60
# to 3.87) and from 6.41 to 5.38 ms at the OLMoE-style one (int8 4.53 to 3.67); 2 threads: 3.23 to
# 2.73, 2.28 to 2.02, 3.35 to 2.86, 2.34 to 2.06 ms.
KEY_AHEAD = 1  # key blocks
VALUE_AHEAD = 16  # value rows


def _byte(x):
    """An int8 element's bits as 0..255."""
    return T.bitwise_and(T.Cast("int32", x), 255)


def stored_scale(b0, b1, b2, b3):
    """The float32 whose little-endian bytes are the int8 elements b0..b3."""
    bits = _byte(b0) | T.shift_left(_byte(b1), 8) | T.shift_left(_byte(b2), 16) | T.shift_left(_byte(b3), 24)
    return T.reinterpret("float32", bits)


def scale_byte(scale, k: int):
    """Byte k (little-endian) of the float32 `scale`, as an int8 element."""
    return T.Cast("int8", T.bitwise_and(T.shift_right(T.reinterpret("int32", scale), 8 * k), 255))


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def append_keys(kv_heads: int, head_dim: int, dtype: str, block: int, dot: bool = False):
    """cache (b, kv_heads, blocks, head_dim, block) <- new (b, kv_heads, s, head_dim) at positions p..p+s-1
    (dot: the int8 cache in dot order, append_quantized)."""
    if dtype in KV_QUANTIZED:
        return append_quantized(kv_heads, head_dim, True, block, dot)

    @T.prim_func(private=True, s_tir=True)
    def kv_append_keys(cache_h: T.handle, new_h: T.handle, p: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s, blocks = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (b, kv_heads, blocks, head_dim, block), dtype)
        new = T.match_buffer(new_h, (b, kv_heads, s, head_dim), "float32")
        for bh in T.parallel(b * kv_heads):
            for i, d in T.grid(s, head_dim):
                with T.sblock("append"):
                    cache[bh // kv_heads, bh % kv_heads, (p + i) // block, d, (p + i) % block] = T.Cast(
                        dtype, new[bh // kv_heads, bh % kv_heads, i, d])

    return kv_append_keys


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def append_values(kv_heads: int, head_dim: int, dtype: str, block: int, dot: bool = False):
    """cache (b, kv_heads, blocks, block, head_dim) <- new (b, kv_heads, s, head_dim) at positions p..p+s-1
    (dot: the int8 cache in dot order, append_quantized)."""
    if dtype in KV_QUANTIZED:
        return append_quantized(kv_heads, head_dim, False, block, dot)

    @T.prim_func(private=True, s_tir=True)
    def kv_append_values(cache_h: T.handle, new_h: T.handle, p: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s, blocks = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (b, kv_heads, blocks, block, head_dim), dtype)
        new = T.match_buffer(new_h, (b, kv_heads, s, head_dim), "float32")
        for bh in T.parallel(b * kv_heads):
            for i in T.serial(s):
                for d in T.vectorized(head_dim):
                    with T.sblock("append"):
                        cache[bh // kv_heads, bh % kv_heads, (p + i) // block, (p + i) % block, d] = T.Cast(
                            dtype, new[bh // kv_heads, bh % kv_heads, i, d])

    return kv_append_values


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def append_quantized(kv_heads: int, head_dim: int, keys: bool, block: int, dot: bool = False):
    """int8 cache <- new (b, kv_heads, s, head_dim) at positions p..p+s-1, each position's row
    quantized with its scale's bytes beside it:
      keys   (b, kv_heads, blocks, head_dim + 4, block) (transposed), the scale's 4 rows after;
      values (b, kv_heads, blocks, block, head_dim + 4), the scale after each row;
    or in dot order (KVCacheLayout.dot, dot_attention's operands):
      keys   (b, kv_heads, blocks, head_dim / 4 + 1, block * 4): dimension d of position l at
             [d // 4, 4 l + d % 4], plus 128 (the unsigned operand of vpdpbusd); the last row holds
             the positions' scales, [4 l : 4 l + 4] position l's float32 (one vector load a block);
      values (b, kv_heads, blocks, block * (head_dim + 4)): dimension d of position j at
             [(j // 4) * 4 head_dim + 4 d + j % 4], then the block's scales, position j's float32 at
             [block * head_dim + 4 j]."""
    rows, groups = head_dim + KV_SCALE_BYTES, head_dim // 4
    if not dot:
        shape = (lambda b, n: (b, kv_heads, n, rows, block)) if keys else (lambda b, n: (b, kv_heads, n, block, rows))
        element = (lambda bi, g, kb, kl, d: (bi, g, kb, d, kl)) if keys else (lambda bi, g, kb, kl, d: (bi, g, kb, kl, d))
        scale_element = (lambda bi, g, kb, kl, k: (bi, g, kb, head_dim + k, kl)) if keys else \
            (lambda bi, g, kb, kl, k: (bi, g, kb, kl, head_dim + k))
    elif keys:
        shape = lambda b, n: (b, kv_heads, n, groups + 1, block * 4)  # noqa: E731
        element = lambda bi, g, kb, kl, d: (bi, g, kb, d // 4, kl * 4 + d % 4)  # noqa: E731
        scale_element = lambda bi, g, kb, kl, k: (bi, g, kb, groups, kl * 4 + k)  # noqa: E731
    else:
        shape = lambda b, n: (b, kv_heads, n, block * rows)  # noqa: E731
        element = lambda bi, g, kb, kl, d: (bi, g, kb, kl // 4 * (4 * head_dim) + d * 4 + kl % 4)  # noqa: E731
        scale_element = lambda bi, g, kb, kl, k: (bi, g, kb, block * head_dim + kl * 4 + k)  # noqa: E731

    def stored(x):
        if dot and keys:  # x + 128 in 1..255: the byte's bits, as an int8 element
            return T.Cast("int8", T.Cast("int32", T.round(x)) + 128)
        return T.Cast("int8", T.round(x))

    @T.prim_func(private=True)
    def kv_append_quantized(cache_h: T.handle, new_h: T.handle, p: T.int64):
        # Opaque: a position's scale needs its whole row, so FuseOps must not treat this as elementwise.
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        b, s, blocks = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, shape(b, blocks), "int8")
        new = T.match_buffer(new_h, (b, kv_heads, s, head_dim), "float32")
        for bh in T.parallel(b * kv_heads):
            for i in T.serial(s):
                if True:
                    amax = T.decl_buffer((1,), "float32", scope=STACK)
                    bi: T.let[T.int64] = bh // kv_heads
                    g: T.let[T.int64] = bh % kv_heads
                    amax[0] = T.float32(0)
                    for d in T.serial(head_dim):
                        amax[0] = T.max(amax[0], T.fabs(new[bi, g, i, d]))
                    inv: T.let[T.float32] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                    kb: T.let[T.int64] = (p + i) // block
                    kl: T.let[T.int64] = (p + i) % block
                    for d in T.serial(head_dim):
                        cache[element(bi, g, kb, kl, d)] = stored(new[bi, g, i, d] * inv)
                    for k in T.unroll(KV_SCALE_BYTES):
                        cache[scale_element(bi, g, kb, kl, k)] = scale_byte(amax[0] / T.float32(127), k)

    return kv_append_quantized


def dot_order_fits(key_dim: int, value_dim: int, block: int) -> bool:
    """Whether an int8 cache of these sizes can be kept in dot order: whole 4-byte groups of key
    dimensions and of positions, and whole 16-lane vectors of positions and of value dimensions."""
    return key_dim % 4 == 0 and value_dim % 16 == 0 and block % 16 == 0


@T.macro
def _exponentiate(scores, lane_max, lane_total, row_max, total, m, bi, h, i, blocks, lanes, visible):
    """Query row (bi, h, i)'s scores over key blocks 0..blocks-1, their largest per lane in
    lane_max[m]: each becomes exp(score - the row's largest), 0 past the visible positions (a
    weighted sum may read whole blocks), and total[m] their sum (lane_total[m] starts at 0)."""
    row_max[m] = T.float32(-3.0e38)
    for l in T.serial(lanes):
        row_max[m] = T.max(row_max[m], lane_max[m, l])
    for jb in T.serial(blocks):
        for l in T.vectorized(lanes):
            scores[bi, h, i, jb * lanes + l] = T.if_then_else(
                jb * lanes + l < visible, vector_exp(scores[bi, h, i, jb * lanes + l] - row_max[m]), T.float32(0))
            lane_total[m, l] = lane_total[m, l] + scores[bi, h, i, jb * lanes + l]
    total[m] = T.float32(0)
    for l in T.serial(lanes):
        total[m] = total[m] + lane_total[m, l]


def _shared_heads(heads: int, kv_heads: int) -> int:
    """Query heads per attention task: those sharing a KV head, at most 4 (a divisor of the group).
    Sharing reads each key and value once for the task, not once per head; past 4 the key block
    falls to 8 lanes and the task is too narrow (16 query heads over 2 KV heads, 24 layers, 1024
    positions, 1 thread: fp16 3.11 ms for 8 heads a task, 2.27 for 4; int8 3.28 and 2.02). int8
    caches shared too (GraniteMoE's pairs: 3.10 ms one head a task, 2.05 shared)."""
    group = heads // kv_heads
    return next(s for s in (4, 3, 2, 1) if group % s == 0)


def key_block(heads: int, kv_heads: int) -> int:
    """The keys the attention kernel scores together, LANES floats of accumulators over the query
    heads of a task: a power of two, and the cache layout's block (KVCacheLayout.block), so that a
    key block is one contiguous run (blocks of 64 positions scored 32 at a time, GraniteMoE's
    GQA pairs, took 5.1-5.3 ms where blocks of 32 took 4.3-4.4; 1024 positions, 24 layers, 1 thread)."""
    return LANES >> (_shared_heads(heads, kv_heads) - 1).bit_length()


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def cached_attention(heads: int, kv_heads: int, key_dim: int, value_dim: int, dtype: str, scale: float, block: int,
                     dot: bool = False):
    """out (b, s, heads, value_dim) = causal softmax(q K^T * scale) V for queries q (b, heads, s,
    key_dim) at positions p..p+s-1 over cached positions 0..p+s-1. `scores` (b, heads, s, cap) is
    scratch. Keys past the visible length are read (to the next multiple of the block, within
    the capacity) and masked.

    One task per KV head (`shared` query heads, up to 4, of the `group` that share it): its query
    heads are scored and summed together, so each cached key and value is read (and converted to
    float32) once a task, not once per query head; the key block shrinks by the heads so the
    accumulators stay LANES wide in all. dot: an int8 cache in dot order, dot_attention."""
    if dot:
        return dot_attention(heads, kv_heads, key_dim, value_dim, scale, block)
    group = heads // kv_heads
    vd = value_dim
    quantized = dtype in KV_QUANTIZED
    extra = KV_SCALE_BYTES if quantized else 0
    shared = _shared_heads(heads, kv_heads)
    lanes = min(key_block(heads, kv_heads), block)  # both powers of two: lanes divides the block
    per_block = block // lanes
    # Values are summed over keys as `unroll` interleaved partial rows (each vd lanes, per head of
    # the task), so consecutive keys' multiply-adds do not wait on each other, within 64 floats of
    # accumulators (8 AVX2 / 16 NEON registers): at 256 (4 rows of 64) AVX2 spilled them, and the
    # GraniteMoE-shaped attention over 1024 positions (24 layers, 1 thread) took 6.7 ms (int8
    # cache) and 4.7 ms (float16) against 5.0 and 4.55 ms now; rows of 64 or more lanes already
    # give 8 independent chains.
    unroll = max(1, min(4, 64 // (vd * shared)))

    line_elements = 64 // {"float32": 4, "float16": 2, "int8": 1}[dtype]  # per cache line
    key_lines = max(1, lanes // line_elements)  # per key row of a block
    value_lines = -(-(value_dim + extra) // line_elements)  # per value row (the next row may straddle one more)

    def key_at(keys, bi, g, d, jb, l):  # element d of key l of key block jb (lanes positions)
        return keys[bi, g, jb // per_block, d, jb % per_block * lanes + l]

    def value_at(values, bi, g, j, d):  # element d of position j's value
        return values[bi, g, j // block, j % block, d]

    def key_scale(keys, bi, g, jb, l):  # of key l of key block jb (int8): the 4 rows after key_dim
        return stored_scale(*(key_at(keys, bi, g, key_dim + k, jb, l) for k in range(KV_SCALE_BYTES)))

    def weight(scores, values, bi, h, i, g, j):  # position j's softmax weight, times its value row's scale (int8)
        if not quantized:
            return scores[bi, h, i, j]
        return scores[bi, h, i, j] * stored_scale(*(value_at(values, bi, g, j, value_dim + k) for k in range(KV_SCALE_BYTES)))

    # With one query head per task (shared 1) the keys and values are read straight into the
    # multiply-adds; staging them through `key` / `row` costs that case 5-30%.
    def key_operand(keys, key, bi, g, d, jb, l):
        return key[l] if shared > 1 else T.Cast("float32", key_at(keys, bi, g, d, jb, l))

    def value_operand(values, row, bi, g, j, d):
        return row[d] if shared > 1 else T.Cast("float32", value_at(values, bi, g, j, d))

    @T.prim_func(private=True)
    def attention(q_h: T.handle, keys_h: T.handle, values_h: T.handle, p: T.int64, out_h: T.handle,
                  scores_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s, nb, cap = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, key_dim), "float32")
        keys = T.match_buffer(keys_h, (b, kv_heads, nb, key_dim + extra, block), dtype)
        values = T.match_buffer(values_h, (b, kv_heads, nb, block, value_dim + extra), dtype)
        out = T.match_buffer(out_h, (b, s, heads, value_dim), "float32")
        scores = T.match_buffer(scores_h, (b, heads, s, cap), "float32")
        for task in T.parallel(b * (heads // shared)):
            for i in T.serial(s):
                if True:
                    acc = T.decl_buffer((shared, lanes), "float32", scope=STACK)
                    key = T.decl_buffer((lanes,), "float32", scope=STACK)
                    lane_max = T.decl_buffer((shared, lanes), "float32", scope=STACK)
                    lane_total = T.decl_buffer((shared, lanes), "float32", scope=STACK)
                    row_max = T.decl_buffer((shared,), "float32", scope=STACK)
                    total = T.decl_buffer((shared,), "float32", scope=STACK)
                    row = T.decl_buffer((vd,), "float32", scope=STACK)
                    o = T.decl_buffer((shared, unroll, value_dim), "float32", scope=STACK)
                    visible: T.let[T.int64] = p + i + 1
                    blocks: T.let[T.int64] = T.min((visible + lanes - 1) // lanes, nb * per_block)
                    steps: T.let[T.int64] = visible // unroll
                    bi: T.let[T.int64] = task // (heads // shared)
                    h0: T.let[T.int64] = task % (heads // shared) * shared  # the task's first query head
                    g: T.let[T.int64] = h0 // group
                    for m in T.unroll(shared):
                        for l in T.vectorized(lanes):
                            lane_max[m, l] = T.float32(-3.0e38)
                            lane_total[m, l] = T.float32(0)
                    for jb in T.serial(blocks):
                        for m in T.unroll(shared):
                            for l in T.vectorized(lanes):
                                acc[m, l] = T.float32(0)
                        for k in T.unroll(extra):  # int8: the scale rows
                            prefetch_line(T.address_of(key_at(keys, bi, g, key_dim + k, jb + KEY_AHEAD, 0)))
                        for d in T.serial(key_dim):
                            for line in T.unroll(key_lines):
                                prefetch_line(T.address_of(key_at(keys, bi, g, d, jb + KEY_AHEAD, line * line_elements)))
                            if shared > 1:
                                for l in T.vectorized(lanes):
                                    key[l] = T.Cast("float32", key_at(keys, bi, g, d, jb, l))
                            for m in T.unroll(shared):
                                for l in T.vectorized(lanes):
                                    acc[m, l] = acc[m, l] + q[bi, h0 + m, i, d] * key_operand(keys, key, bi, g, d, jb, l)
                        if quantized:
                            for l in T.vectorized(lanes):
                                key[l] = key_scale(keys, bi, g, jb, l)
                            for m in T.unroll(shared):
                                for l in T.vectorized(lanes):
                                    acc[m, l] = acc[m, l] * key[l]
                        for m in T.unroll(shared):
                            for l in T.vectorized(lanes):
                                scores[bi, h0 + m, i, jb * lanes + l] = T.if_then_else(
                                    jb * lanes + l < visible, acc[m, l] * T.float32(scale), T.float32(-3.0e38))
                                lane_max[m, l] = T.max(lane_max[m, l], scores[bi, h0 + m, i, jb * lanes + l])
                    for m in T.unroll(shared):
                        _exponentiate(scores, lane_max, lane_total, row_max, total, m, bi, h0 + m, i, blocks, lanes, visible)
                        for u in T.unroll(unroll):
                            for d in T.vectorized(vd):
                                o[m, u, d] = T.float32(0)
                    for js in T.serial(steps):  # keys past the last whole step go to the first row
                        for u in T.unroll(unroll):
                            for line in T.unroll(value_lines):
                                prefetch_line(T.address_of(value_at(values, bi, g, js * unroll + u + VALUE_AHEAD, line * line_elements)))
                            if shared > 1:
                                for d in T.vectorized(vd):
                                    row[d] = T.Cast("float32", value_at(values, bi, g, js * unroll + u, d))
                            for m in T.unroll(shared):
                                for d in T.vectorized(vd):
                                    o[m, u, d] = o[m, u, d] + weight(scores, values, bi, h0 + m, i, g, js * unroll + u) \
                                        * value_operand(values, row, bi, g, js * unroll + u, d)
                    for j in T.serial(visible - steps * unroll):
                        if shared > 1:
                            for d in T.vectorized(vd):
                                row[d] = T.Cast("float32", value_at(values, bi, g, steps * unroll + j, d))
                        for m in T.unroll(shared):
                            for d in T.vectorized(vd):
                                o[m, 0, d] = o[m, 0, d] + weight(scores, values, bi, h0 + m, i, g, steps * unroll + j) \
                                    * value_operand(values, row, bi, g, steps * unroll + j, d)
                    for m in T.unroll(shared):
                        for d in T.vectorized(vd):
                            out[bi, i, h0 + m, d] = o[m, 0, d]
                        for u in T.serial(unroll - 1):
                            for d in T.vectorized(vd):
                                out[bi, i, h0 + m, d] = out[bi, i, h0 + m, d] + o[m, u + 1, d]
                        for d in T.vectorized(vd):
                            out[bi, i, h0 + m, d] = out[bi, i, h0 + m, d] / total[m]

    return attention


def dot4(acc, unsigned, signed):
    """x86 AVX512-VNNI vpdpbusd: acc (int32x16) + in each lane the dot of 4 unsigned bytes of
    `unsigned` and the 4 signed bytes of `signed` (both int8x64)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, unsigned, signed)


def _splat4(buffer, m, at):
    """Bytes at..at+3 of buffer row m, as 16 copies of their int32 (the operand every lane shares)."""
    return T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", buffer[m, T.ramp(at, 1, 4)]), 16))


# Into L2 (prefetcht2), as the integer GEMVs' weights (gemv.PREFETCH_LOCALITY): the OLMoE-style
# attention over 1024 positions, 16 layers, 1 thread, other data read between the layers: 3.14-3.31
# ms against 3.38-3.47 with prefetcht0.
DOT_PREFETCH_LOCALITY = 1


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def dot_attention(heads: int, kv_heads: int, key_dim: int, value_dim: int, scale: float, block: int):
    """cached_attention over an int8 cache in dot order (append_quantized), in integer dot products.

    Per task (KV head, `shared` query heads) and query: each query head row is quantized to int8
    (scale amax / 127), and a key block's scores are `lanes` int32 sums of (key + 128) * q, less
    128 * sum(q), times the two scales. The softmax as cached_attention's; then per cache block,
    each position's weight times its value row's scale, quantized to uint8 (scale: the block's
    largest / 255; positions past the visible ones weigh 0), is the unsigned operand against the
    values: per block `value_dim` int32 sums, added to the float32 output times that scale. The
    rounding of both (relative error of the output ~1e-3 of its largest element on random data,
    tests/test_decode_path.py) comes on top of the cache's own int8 rounding.

    OLMoE-style shape (16 heads of 64, no GQA), 1 thread: one layer's 512 cached positions held in
    L2, 39-47 us a call for cached_attention against 25-31 us; 16 layers' 1024 positions from
    memory, other data read between the layers, 3.7-4.0 ms against 3.1-3.3 ms. In that int4s model
    at context 1024 (perf samples, 64 steps): 3.78 against 3.02 ms a token."""
    assert dot_order_fits(key_dim, value_dim, block), (key_dim, value_dim, block)
    group = heads // kv_heads
    shared = _shared_heads(heads, kv_heads)
    lanes = min(key_block(heads, kv_heads), block)
    per_block = block // lanes
    kd, vd = key_dim, value_dim
    groups = kd // 4  # rows of 4 key dimensions; row `groups` holds the scales
    value_bytes = block * (vd + KV_SCALE_BYTES)
    key_lines = lanes * 4 // 64  # per row of a key block
    value_lines = -(-value_bytes // 64 // (block // 4))  # per 4 positions: the next block's lines, spread
    locality = DOT_PREFETCH_LOCALITY

    @T.prim_func(private=True)
    def attention(q_h: T.handle, keys_h: T.handle, values_h: T.handle, p: T.int64, out_h: T.handle, scores_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s, nb, cap = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, kd), "float32")
        keys = T.match_buffer(keys_h, (b, kv_heads, nb, groups + 1, block * 4), "int8")
        values = T.match_buffer(values_h, (b, kv_heads, nb, value_bytes), "int8")
        out = T.match_buffer(out_h, (b, s, heads, vd), "float32")
        scores = T.match_buffer(scores_h, (b, heads, s, cap), "float32")
        for task in T.parallel(b * (heads // shared)):
            for i in T.serial(s):
                if True:
                    q8 = T.decl_buffer((shared, kd), "int8", scope=STACK)
                    q_scale = T.decl_buffer((shared,), "float32", scope=STACK)
                    q_offset = T.decl_buffer((shared,), "int32", scope=STACK)  # 128 * sum(q8)
                    amax = T.decl_buffer((1,), "float32", scope=STACK)
                    q_sum = T.decl_buffer((1,), "int32", scope=STACK)
                    dots = T.decl_buffer((shared, lanes), "int32", scope=STACK)
                    key_scale = T.decl_buffer((lanes,), "float32", scope=STACK)
                    lane_max = T.decl_buffer((shared, lanes), "float32", scope=STACK)
                    lane_total = T.decl_buffer((shared, lanes), "float32", scope=STACK)
                    row_max = T.decl_buffer((shared,), "float32", scope=STACK)
                    total = T.decl_buffer((shared,), "float32", scope=STACK)
                    value_scale = T.decl_buffer((block,), "float32", scope=STACK)
                    w = T.decl_buffer((shared, block), "float32", scope=STACK)
                    w8 = T.decl_buffer((shared, block), "uint8", scope=STACK)
                    w_max = T.decl_buffer((shared,), "float32", scope=STACK)
                    sums = T.decl_buffer((shared, vd), "int32", scope=STACK)
                    o = T.decl_buffer((shared, vd), "float32", scope=STACK)
                    visible: T.let[T.int64] = p + i + 1
                    blocks: T.let[T.int64] = T.min((visible + lanes - 1) // lanes, nb * per_block)
                    bi: T.let[T.int64] = task // (heads // shared)
                    h0: T.let[T.int64] = task % (heads // shared) * shared  # the task's first query head
                    g: T.let[T.int64] = h0 // group
                    for m in T.unroll(shared):
                        amax[0] = T.float32(0)
                        for d in T.serial(kd):
                            amax[0] = T.max(amax[0], T.fabs(q[bi, h0 + m, i, d]))
                        q_sum[0] = 0
                        for d in T.serial(kd):
                            q8[m, d] = T.Cast("int8", T.round(q[bi, h0 + m, i, d] * T.if_then_else(
                                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
                            q_sum[0] = q_sum[0] + T.Cast("int32", q8[m, d])
                        q_scale[m] = amax[0] / T.float32(127) * T.float32(scale)
                        q_offset[m] = q_sum[0] * 128
                        for l in T.vectorized(lanes):
                            lane_max[m, l] = T.float32(-3.0e38)
                            lane_total[m, l] = T.float32(0)
                        for d in T.vectorized(vd):
                            o[m, d] = T.float32(0)
                    for jb in T.serial(blocks):
                        for m in T.unroll(shared):
                            for l in T.vectorized(lanes):
                                dots[m, l] = 0
                        # A run-time trip count (nb >= 1: `groups`): unrolled whole, LLVM hoisted the
                        # query's broadcasts out of the block loop and spilled them (1.3x slower).
                        for r in T.serial(T.min(groups, nb * groups)):
                            for line in T.unroll(key_lines):
                                prefetch_line(T.address_of(keys[bi, g, (jb + 1) // per_block, r, (jb + 1) % per_block * lanes * 4 + line * 64]), locality)
                            for m in T.unroll(shared):
                                for v in T.unroll(lanes // 16):
                                    dots[m, T.ramp(v * 16, 1, 16)] = dot4(
                                        dots[m, T.ramp(v * 16, 1, 16)],
                                        keys[bi, g, jb // per_block, r, T.ramp(jb % per_block * lanes * 4 + v * 64, 1, 64)], _splat4(q8, m, r * 4))
                        for line in T.unroll(key_lines):
                            prefetch_line(T.address_of(keys[bi, g, (jb + 1) // per_block, groups, (jb + 1) % per_block * lanes * 4 + line * 64]), locality)
                        for v in T.unroll(lanes // 16):
                            key_scale[T.ramp(v * 16, 1, 16)] = T.reinterpret(
                                "float32x16", keys[bi, g, jb // per_block, groups, T.ramp(jb % per_block * lanes * 4 + v * 64, 1, 64)])
                        for m in T.unroll(shared):
                            for l in T.vectorized(lanes):
                                scores[bi, h0 + m, i, jb * lanes + l] = T.if_then_else(
                                    jb * lanes + l < visible,
                                    T.Cast("float32", dots[m, l] - q_offset[m]) * q_scale[m] * key_scale[l], T.float32(-3.0e38))
                                lane_max[m, l] = T.max(lane_max[m, l], scores[bi, h0 + m, i, jb * lanes + l])
                    for m in T.unroll(shared):
                        _exponentiate(scores, lane_max, lane_total, row_max, total, m, bi, h0 + m, i, blocks, lanes, visible)
                    for jc in T.serial((visible + block - 1) // block):
                        for v in T.unroll(block // 16):
                            value_scale[T.ramp(v * 16, 1, 16)] = T.reinterpret(
                                "float32x16", values[bi, g, jc, T.ramp(block * vd + v * 64, 1, 64)])
                        for m in T.unroll(shared):
                            for l in T.vectorized(block):
                                w[m, l] = T.if_then_else(jc * block + l < visible, scores[bi, h0 + m, i, jc * block + l] * value_scale[l],
                                                         T.float32(0))
                            w_max[m] = T.float32(0)
                            for l in T.serial(block):
                                w_max[m] = T.max(w_max[m], w[m, l])
                            for l in T.vectorized(block):
                                w8[m, l] = T.Cast("uint8", T.round(w[m, l] * T.if_then_else(
                                    w_max[m] > T.float32(0), T.float32(255) / w_max[m], T.float32(0))))
                            for d in T.vectorized(vd):
                                sums[m, d] = 0
                        # The visible groups of 4 positions (a run-time count, as the key rows').
                        for j4 in T.serial(T.min(block // 4, (visible - jc * block + 3) // 4)):
                            for line in T.unroll(value_lines):
                                prefetch_line(T.address_of(values[bi, g, jc + 1, (j4 * value_lines + line) * 64]), locality)
                            for m in T.unroll(shared):
                                for v in T.unroll(vd // 16):
                                    sums[m, T.ramp(v * 16, 1, 16)] = dot4(
                                        sums[m, T.ramp(v * 16, 1, 16)], _splat4(w8, m, j4 * 4), values[bi, g, jc, T.ramp(j4 * vd * 4 + v * 64, 1, 64)])
                        for m in T.unroll(shared):
                            for d in T.vectorized(vd):
                                o[m, d] = o[m, d] + T.Cast("float32", sums[m, d]) * (w_max[m] / T.float32(255))
                    for m in T.unroll(shared):
                        for d in T.vectorized(vd):
                            out[bi, i, h0 + m, d] = o[m, d] / total[m]

    return attention
