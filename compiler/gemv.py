"""Hand-scheduled CPU kernels for x @ W with W stored quantized in the (K, N) kernel layout.

At decode every matmul is a GEMV: each weight is used once, so the cost is what it takes to
turn stored bytes into fp32 products. The TE form (quant.py's `_matmul_te`) dequantizes every
weight completely inside the reduction: load and convert the zero point and scale, subtract,
multiply, then the product; ~5 vector operations per 8 weights, about 5 G weights/s on a
Xeon core and far from the memory bound. Here the affine part is factored out of the reduction:

  int4   y[j] = sum_g scale[g, j] * (sum_{k in g} x[k] * q[k, j]  -  zero[g, j] * sum_{k in g} x[k])
  int8   y[j] = scale[j] * sum_k x[k] * q[k, j]
  fp16/32 y[j] = sum_k x[k] * w[k, j]

so the inner loop is: load a row of stored bytes for LANES columns, unpack the two nibbles (int4),
convert, multiply-add; one pass per byte row serves two values of k. LANES columns give
LANES / 8 independent AVX2 accumulators (4 at 32), enough to hide the FMA latency. Columns
are split across threads (`parallel`), rows of x loop inside, so a prefill re-reads each tile
of weights from cache rather than memory.

These kernels are complete schedules (`tirx.is_scheduled`): dlight and the tuner leave them
alone. They read the tiled storage of quant.py (a tile = `lanes` output columns, stored as one
contiguous block); weights whose widths no tile divides, and GPU targets, keep the plain
layout and the TE form. dense_weights.py pads the LM head to a tile.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .quant import Scheme

LANES = 64


def lanes_for(*dims: int) -> int | None:
    """The tile (vector width) for weights with these output widths, or None when no
    hand-scheduled kernel fits them all."""
    return next((lanes for lanes in (LANES, 32, 16) if all(n % lanes == 0 for n in dims)), None)


def matmul(k_dim: int, n_dim: int, s: Scheme) -> tirx.PrimFunc:
    """(x (rows, K) f32, *stored weights) -> out (rows, N) f32, for the tiled stored form of `s`
    (quant.py: each (rows, N) tensor as (N / tile, rows, tile))."""
    lanes = s.tile
    assert lanes and n_dim % lanes == 0, (s, n_dim)
    tiles = n_dim // lanes
    if s.name == "int4":
        return _int4(k_dim, n_dim, s.group_size, lanes, tiles)
    if s.name == "int8":
        return _int8(k_dim, n_dim, lanes, tiles)
    return _float(k_dim, n_dim, "float16" if s.name == "fp16" else "float32", lanes, tiles)


def _int4(k_dim: int, n_dim: int, group: int, lanes: int, tiles: int) -> tirx.PrimFunc:
    groups, pairs = k_dim // group, group // 2

    @T.prim_func(private=True)
    def int4_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, zero_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim // 2, lanes), "uint8")
        scale = T.match_buffer(scale_h, (tiles, groups, lanes), "float16")
        zero = T.match_buffer(zero_h, (tiles, groups, lanes), "uint8")
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        for tile in T.parallel(tiles):
            for i in T.serial(rows):
                acc = T.decl_buffer((lanes,), "float32", scope="local")
                part = T.decl_buffer((lanes,), "float32", scope="local")
                x_sum = T.decl_buffer((1,), "float32", scope="local")
                for l in T.vectorized(lanes):
                    acc[l] = T.float32(0)
                for g in T.serial(groups):
                    x_sum[0] = T.float32(0)
                    for l in T.vectorized(lanes):
                        part[l] = T.float32(0)
                    for kk in T.serial(pairs):
                        for l in T.vectorized(lanes):
                            part[l] = part[l] + x[i, g * group + kk * 2] * T.Cast(
                                "float32", T.bitwise_and(q[tile, g * pairs + kk, l], T.uint8(15))) \
                                + x[i, g * group + kk * 2 + 1] * T.Cast(
                                "float32", T.shift_right(q[tile, g * pairs + kk, l], T.uint8(4)))
                        x_sum[0] = x_sum[0] + x[i, g * group + kk * 2] + x[i, g * group + kk * 2 + 1]
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + T.Cast("float32", scale[tile, g, l]) * (
                            part[l] - T.Cast("float32", zero[tile, g, l]) * x_sum[0])
                for l in T.vectorized(lanes):
                    out[i, tile * lanes + l] = acc[l]

    return int4_matmul


def _int8(k_dim: int, n_dim: int, lanes: int, tiles: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def int8_matmul(x_h: T.handle, q_h: T.handle, scale_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        q = T.match_buffer(q_h, (tiles, k_dim, lanes), "int8")
        scale = T.match_buffer(scale_h, (n_dim,), "float32")
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        for tile in T.parallel(tiles):
            for i in T.serial(rows):
                acc = T.decl_buffer((lanes,), "float32", scope="local")
                for l in T.vectorized(lanes):
                    acc[l] = T.float32(0)
                for k in T.serial(k_dim):
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + x[i, k] * T.Cast("float32", q[tile, k, l])
                for l in T.vectorized(lanes):
                    out[i, tile * lanes + l] = acc[l] * scale[tile * lanes + l]

    return int8_matmul


def _float(k_dim: int, n_dim: int, dtype: str, lanes: int, tiles: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def float_matmul(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, k_dim), "float32")
        w = T.match_buffer(w_h, (tiles, k_dim, lanes), dtype)
        out = T.match_buffer(out_h, (rows, n_dim), "float32")
        for tile in T.parallel(tiles):
            for i in T.serial(rows):
                acc = T.decl_buffer((lanes,), "float32", scope="local")
                for l in T.vectorized(lanes):
                    acc[l] = T.float32(0)
                for k in T.serial(k_dim):
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + x[i, k] * T.Cast("float32", w[tile, k, l])
                for l in T.vectorized(lanes):
                    out[i, tile * lanes + l] = acc[l]

    return float_matmul
