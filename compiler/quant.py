"""Weight-only quantization of experts and of the dense part's linear layers and embedding
table (compiler/dense_weights.py), with dequantization fused into the matmul kernels.

Weights are stored in the kernel layout (in, out) = (K, N); activations stay fp32 and every
product accumulates in fp32. Schemes:

  fp32  plain weights.
  fp16  half-precision storage.
  int8  symmetric, one fp32 scale per output channel:  w[k, n] = q[k, n] * scale[n].
  int4  asymmetric, group-wise along K (groups of `group_size` input rows share a scale and a
        zero point per output channel), two values per byte (low nibble = even k):
        w[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n].

Tiled storage (`Scheme.tile`, CPU targets): every (rows, N) tensor is stored tile-major as
(N / tile, rows, tile), so the GEMV kernel (compiler/gemv.py), which gives each thread whole
tiles of `tile` output columns, streams one contiguous block per tile. Read row by row in the
plain layout, a tile touched one cache line per row, 512 bytes apart: the hardware prefetcher
lost track and a cold int4 expert matrix ran at 2.2 GB/s (118 us) against 3.5 GB/s (74 us)
tiled. 1-D tensors (int8 scales) are the same bytes either way and stay (N,).

Dot-interleaved storage (`Scheme.dot`, int8/int4 on CPUs with 4-byte integer dot products, see
gemv.py): inside a tile, the bytes of a column for 4 consecutive inputs lie together, so a tile
is (rows / 4, tile * 4) bytes: int8 byte [r, 4 l + t] = q[4 r + t, l]; int4 byte [r, 4 l + t] =
q[8 r + t, l] | q[8 r + 4 + t, l] << 4. Same bytes, same count, another order.

The TE kernels (GPU targets, and shapes without a tile) dequantize one weight at a time inside
the reduction, so no fp32 copy of the weights is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te

from moetvm.artifact import DTYPE_BYTES, QUANT_SCHEMES, fused_function
from moetvm.errors import MoetvmError

SCHEMES = QUANT_SCHEMES
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 32


class QuantizationError(MoetvmError, ValueError):
    """An unusable quantization request (scheme, group size, shapes)."""


@dataclass(frozen=True)
class Scheme:
    name: str  # one of SCHEMES
    group_size: int | None = None  # int4 only
    tile: int | None = None  # stored tile-major (N / tile, rows, tile), see above
    dot: bool = False  # tiles dot-interleaved for integer dot products, see above

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise QuantizationError(f"unknown quantization {self.name!r}; choose from {', '.join(SCHEMES)}")
        if self.name == "int4" and (self.group_size is None or self.group_size <= 0 or self.group_size % 2):
            raise QuantizationError(f"int4 needs a positive even group size, got {self.group_size}")
        if self.dot and (self.name not in ("int8", "int4") or not self.tile):
            raise QuantizationError(f"dot-interleaved storage needs int8 or int4 in tiles, got {self.tag}")

    @property
    def tag(self) -> str:
        return self.precision + (f"t{self.tile}" if self.tile else "") + ("d" if self.dot else "")

    @property
    def precision(self) -> str:
        """The tag without the storage layout: what the numbers are, not how they are laid out."""
        return f"int4g{self.group_size}" if self.name == "int4" else self.name

    def tiled(self, tile: int | None, dot: bool = False) -> "Scheme":
        return Scheme(self.name, self.group_size, tile, dot)

    @property
    def interleave(self) -> int:
        """Inputs per stored row of a tile: 2 for packed int4, times 4 when dot-interleaved."""
        return (2 if self.name == "int4" else 1) * (4 if self.dot else 1)

    def check(self, k: int) -> None:
        if self.name == "int4" and k % self.group_size:
            raise QuantizationError(
                f"int4 group size {self.group_size} does not divide the input dimension {k}; "
                f"choose a group size that divides {k}"
            )


def scheme(name: str, group_size: int | None = None) -> Scheme:
    return Scheme(name, (group_size or DEFAULT_GROUP_SIZE) if name == "int4" else None)


# --- NumPy side: quantize, pack, and the reference dequantization ----------------------------
def pack_int4(q: np.ndarray) -> np.ndarray:
    """(K, N) values in [0, 15] -> (K/2, N) bytes, even rows in the low nibble."""
    if q.shape[0] % 2:
        raise QuantizationError(f"int4 packing needs an even number of rows, got {q.shape[0]}")
    q = q.astype(np.uint8)
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8)


def _tile(a: np.ndarray, tile: int | None) -> np.ndarray:
    """(rows, N) -> (N / tile, rows, tile); 1-D tensors are the same bytes tiled or not."""
    if not tile or a.ndim != 2:
        return a
    rows, n = a.shape
    return np.ascontiguousarray(a.reshape(rows, n // tile, tile).transpose(1, 0, 2))


def _dot_interleave(q: np.ndarray, s: Scheme) -> np.ndarray:
    """Weight values (K, N) -> dot-interleaved tiles (N / tile, K / interleave, tile * 4)."""
    k, n, t = q.shape[0], q.shape[1], s.tile
    if s.name == "int4":  # inputs 8r..8r+3 in the low nibbles, 8r+4..8r+7 in the high ones
        q = q.astype(np.uint8).reshape(k // 8, 2, 4, n)
        q = q[:, 0] | (q[:, 1] << 4)
    q = q.reshape(k // s.interleave, 4, n // t, t)  # row, byte, tile, column
    return np.ascontiguousarray(q.transpose(2, 0, 3, 1).reshape(n // t, k // s.interleave, t * 4))


def _dot_deinterleave(a: np.ndarray, s: Scheme) -> np.ndarray:
    tiles, rows, width = a.shape
    t = width // 4
    q = a.reshape(tiles, rows, t, 4).transpose(1, 3, 0, 2).reshape(rows, 4, tiles * t)
    if s.name == "int4":
        q = np.stack([q & 0xF, q >> 4], axis=1)
    return q.reshape(-1, tiles * t)


def _untile(a: np.ndarray, tile: int | None) -> np.ndarray:
    if not tile or a.ndim != 3:
        return a
    tiles, rows, width = a.shape
    return a.transpose(1, 0, 2).reshape(rows, tiles * width)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    out = np.empty((packed.shape[0] * 2, packed.shape[1]), np.uint8)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    return out


def quantize(w: np.ndarray, s: Scheme) -> dict[str, np.ndarray]:
    """Tensors stored for one (K, N) fp32 weight, named by suffix ("" = the weight itself)."""
    w = np.asarray(w, np.float32)
    s.check(w.shape[0])
    if s.tile and w.shape[1] % s.tile:
        raise QuantizationError(f"tile {s.tile} does not divide the output dimension {w.shape[1]}")
    if s.name == "fp32":
        out = {"": w}
    elif s.name == "fp16":
        out = {"": w.astype(np.float16)}
    elif s.name == "int8":
        scale = np.abs(w).max(axis=0) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        out = {"": _dot_interleave(q, s) if s.dot else q, ".scale": scale}
    else:
        g = w.reshape(w.shape[0] // s.group_size, s.group_size, w.shape[1])
        lo, hi = g.min(axis=1), g.max(axis=1)
        scale = (hi - lo) / 15.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(g / scale.astype(np.float32)[:, None]) + zero[:, None], 0, 15).reshape(w.shape)
        out = {"": _dot_interleave(q, s) if s.dot else pack_int4(q), ".scale": scale, ".zero": zero}
    return {suffix: a if s.dot and suffix == "" else _tile(a, s.tile) for suffix, a in out.items()}


def dequantize(t: dict[str, np.ndarray], s: Scheme) -> np.ndarray:
    """The reference: the fp32 weights a quantized tensor stands for."""
    values = _dot_deinterleave(t[""], s) if s.dot else None
    t = {suffix: _untile(a, s.tile) for suffix, a in t.items()}
    if s.name in ("fp32", "fp16"):
        return t[""].astype(np.float32)
    if s.name == "int8":
        return (t[""] if values is None else values).astype(np.float32) * t[".scale"]
    q = (unpack_int4(t[""]) if values is None else values).astype(np.float32)
    groups = np.repeat(np.arange(q.shape[0] // s.group_size), s.group_size)
    return (q - t[".zero"][groups].astype(np.float32)) * t[".scale"][groups].astype(np.float32)


def quantize_activations(x: np.ndarray, block: int = 32) -> np.ndarray:
    """The reference of the integer-dot kernels' activations (gemv.py): x (..., K) rounded to
    int8 per block of `block` inputs with one scale each, returned dequantized."""
    b = np.asarray(x, np.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
    return (np.rint(b * inv) * (amax / np.float32(127))).reshape(x.shape)


def reference_matmul(x: np.ndarray, t: dict[str, np.ndarray], s: Scheme) -> np.ndarray:
    """What the kernels compute for x @ the stored weight, in float64: the weights dequantized,
    and on the integer-dot path the activations too."""
    if s.dot:
        x = quantize_activations(x)
    return np.asarray(x, np.float64) @ dequantize(t, s).astype(np.float64)


def nbytes(t: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in t.values()))


# --- TVM side: fused dequantize-matmul ---------------------------------------------------------
def _dequantized(weights: list[te.Tensor], s: Scheme, k, j):
    """The fp32 value of stored weight (k, j), read straight from the stored tensors."""
    f32, t = "float32", s.tile

    def at(tensor, row):
        return tensor[j // t, row, j % t] if t else tensor[row, j]

    w = weights[0]
    if s.name in ("fp32", "fp16"):
        return at(w, k).astype(f32)
    if s.dot:  # input k's byte: row k // interleave, the column's 4 bytes together
        byte = w[j // t, k // s.interleave, (j % t) * 4 + k % 4]
    else:
        byte = at(w, k // 2) if s.name == "int4" else at(w, k)
    if s.name == "int8":
        return byte.astype(f32) * weights[1][j]
    scale, zero, g = weights[1], weights[2], s.group_size
    shift = (k % 8) // 4 * 4 if s.dot else (k % 2) * 4
    q = (byte >> shift.astype("uint8")) & tvm.tirx.const(15, "uint8")
    return (q.astype(f32) - at(zero, k // g).astype(f32)) * at(scale, k // g).astype(f32)


def _matmul_te(x: te.Tensor, weights: list[te.Tensor], s: Scheme, name: str) -> te.Tensor:
    """x (..., K) @ W (K, N) -> (..., N), W dequantized inside the reduction."""
    *lead, k_dim = x.shape
    out_dim = weights[0].shape[0] * s.tile if s.tile else weights[0].shape[1]
    k = te.reduce_axis((0, k_dim), "k")

    def body(*idx):
        *rows, j = idx
        return te.sum(x[(*rows, k)] * _dequantized(weights, s, k, j), axis=k)
    return te.compute((*lead, out_dim), body, name=name)


def gather_te(ids: te.Tensor, weights: list[te.Tensor], s: Scheme, k_dim: int, name: str) -> te.Tensor:
    """Embedding lookup from a table stored as a (K, N) = (d, vocab) weight: out[i, :] is column
    ids[i], dequantized; an out-of-range id is clamped (the runtime checks ids, the kernel
    never reads out of bounds whatever it is given)."""
    vocab = weights[0].shape[0] * s.tile if s.tile else weights[0].shape[1]

    def body(i, k):
        j = te.max(te.min(ids[i].astype("int64"), vocab - 1), 0)
        return _dequantized(weights, s, k, j)
    return te.compute((ids.shape[0], k_dim), body, name=name)


def weight_params(prefix: str, k: int, n: int, s: Scheme) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of the tensors stored for one (k, n) weight, in call order."""
    if s.name in ("fp32", "fp16"):
        plain = [(prefix, (k, n), "float32" if s.name == "fp32" else "float16")]
    elif s.name == "int8":
        plain = [(prefix, (k, n), "int8"), (prefix + ".scale", (n,), "float32")]
    else:
        groups = k // s.group_size
        plain = [(prefix, (k // 2, n), "uint8"), (prefix + ".scale", (groups, n), "float16"),
                 (prefix + ".zero", (groups, n), "uint8")]
    if not s.tile:
        return plain
    tiled = [(name, (n // s.tile, shape[0], s.tile) if len(shape) == 2 else shape, dtype) for name, shape, dtype in plain]
    if s.dot:
        tiled[0] = (prefix, (n // s.tile, k // s.interleave, s.tile * 4), tiled[0][2])
    return tiled


def scale_dtype(s: Scheme) -> str:
    """The dtype of the scales stored for a weight at `s` (int8 and int4 only)."""
    k = (s.group_size or 1) * 8  # any valid input size: a whole group, whole interleaved rows
    return next(dtype for name, _, dtype in weight_params("w", k, s.tile or 1, s) if name == "w.scale")


def swiglu_params(d_model: int, d_ff: int, s: Scheme) -> list[tuple[str, tuple, str]]:
    s.check(d_model)
    s.check(d_ff)
    return (weight_params("w_gate", d_model, d_ff, s) + weight_params("w_up", d_model, d_ff, s)
            + weight_params("w_down", d_ff, d_model, s))


def matmul_call(bb: relax.BlockBuilder, x: relax.Expr, weights: list, s: Scheme, name: str, cpu: bool) -> relax.Expr:
    """x (..., K) @ the stored weight (K, N) -> (..., N): on CPU targets the hand-scheduled GEMV
    kernel where N allows (compiler/gemv.py), else the TE form for the target's schedules."""
    from . import gemv

    shape = [int(d) for d in weights[0].ty.shape.values]
    if s.tile:
        k_dim, n_dim = shape[1] * s.interleave, shape[0] * s.tile
    else:
        k_dim, n_dim = shape[0] * (2 if s.name == "int4" else 1), shape[1]
    if not cpu or not s.tile:
        return bb.emit_te(lambda a, *w: _matmul_te(a, list(w), s, name), x, *weights,
                          primfunc_name_hint=f"{name}_{s.tag}_matmul")
    lead = list(x.ty.shape.values[:-1])
    rows = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, [-1, k_dim]))
    kernel = bb.add_func(gemv.matmul(k_dim, n_dim, s), f"{s.tag}_matmul_{k_dim}x{n_dim}")
    y = bb.emit(relax.call_tir(kernel, [rows, *weights], relax.TensorType((rows.ty.shape.values[0], n_dim), "float32")))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, [*lead, n_dim]))


@dataclass(frozen=True)
class ResidentRouting:
    """A resident layer function (artifact.MoELayer.resident_function) and the routing it bakes in."""

    function: str
    n_experts: int
    top_k: int
    normalize: bool  # the k weights renormalised to sum to 1
    scaling: float  # then multiplied by this


def top_k_kernel(r: ResidentRouting) -> tvm.tirx.PrimFunc:
    """scores (1, E) -> (chosen (k,) int64, weights (1, k) f32): the k best experts in ascending
    expert order (the order the host path sums them in), ties to the lower index as
    moetvm.routing.select_experts breaks them; weights are their scores, renormalised and
    scaled as the router says. Always k distinct experts in [0, E), whatever the scores (NaN
    included): the pool views taken from them stay in bounds."""
    from tvm.script import tirx as T

    n, k = r.n_experts, r.top_k
    scaling = float(r.scaling)

    @T.prim_func(private=True, s_tir=True)
    def top_k(scores_h: T.handle, chosen_h: T.handle, weights_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        scores = T.match_buffer(scores_h, (1, n), "float32")
        chosen = T.match_buffer(chosen_h, (k,), "int64")
        weights = T.match_buffer(weights_h, (1, k), "float32")
        # One opaque block: Relax inspects single-input kernels for a reshape pattern, which
        # needs a block-structured body.
        with T.sblock("top_k"):
            taken = T.decl_buffer((n,), "int32", scope="local")
            best = T.decl_buffer((1,), "float32", scope="local")
            arg = T.decl_buffer((1,), "int32", scope="local")
            count = T.decl_buffer((1,), "int32", scope="local")
            total = T.decl_buffer((1,), "float32", scope="local")
            for e in T.serial(n):
                taken[e] = 0
            for j in T.serial(k):
                arg[0] = -1
                best[0] = T.float32(0)
                for e in T.serial(n):
                    if taken[e] == 0 and (arg[0] < 0 or scores[0, e] > best[0]):
                        arg[0] = e
                        best[0] = scores[0, e]
                taken[arg[0]] = 1
            count[0] = 0
            total[0] = T.float32(0)
            for e in T.serial(n):
                if taken[e] == 1:
                    chosen[count[0]] = T.Cast("int64", e)
                    weights[0, count[0]] = scores[0, e]
                    total[0] = total[0] + scores[0, e]
                    count[0] = count[0] + 1
            for j in T.serial(k):
                if r.normalize:
                    weights[0, j] = weights[0, j] / total[0] * T.float32(scaling)
                else:
                    weights[0, j] = weights[0, j] * T.float32(scaling)

    return top_k


def swiglu_module(d_model: int, d_ff: int, s: Scheme, name: str, fused_k: tuple[int, ...] = (),
                  cpu: bool = True, resident: tuple[ResidentRouting, ...] = (),
                  slot: tuple[list[int], int] | None = None) -> tvm.IRModule:
    """An IRModule whose function `name` is the expert kernel:
    (x (n, d_model) f32, *weights) -> (n, d_model) = down(silu(x@gate) * (x@up)),
    and for each k in `fused_k` a function `fused_function(name, k)`:
    (x (n, d_model), gates (n, k), *weights of expert 1, ..., *weights of expert k) ->
    sum_i gates[:, i] * expert_i(x): a decode step's whole MoE layer (one token, its k experts)
    in one call, the weighted sum included; and for each of `resident` its function (x (1, d),
    scores (1, E), pool) -> (1, d) (artifact.MoELayer.resident_function), the experts read
    at the `slot` layout (offsets, slot bytes) of the pool: by gemv.resident_layer, one kernel for
    the whole layer, where the scheme has one (integer-dot CPUs), else through views into the pool
    given to the experts' own GEMVs.
    cpu: the matmuls use compiler/gemv.py's kernels."""
    from . import gemv

    specs = swiglu_params(d_model, d_ff, s)
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")

    def expert(x, params: dict):
        def matmul(a, prefix):
            group = [v for key, v in params.items() if key == prefix or key.startswith(prefix + ".")]
            return matmul_call(bb, a, group, s, prefix, cpu)

        h = bb.emit(relax.op.multiply(relax.op.nn.silu(matmul(x, "w_gate")), matmul(x, "w_up")))
        return matmul(h, "w_down")

    def weight_vars(tag: str = "") -> dict:
        return {p: relax.Var(p.replace(".", "_") + tag, relax.TensorType(shape, dtype)) for p, shape, dtype in specs}

    x = relax.Var("x", relax.TensorType((n, d_model), "float32"))
    params = weight_vars()
    with bb.function(name, [x, *params.values()]):
        with bb.dataflow():
            y = bb.emit_output(expert(x, params))
        bb.emit_func_output(y)
    for k in fused_k:
        x = relax.Var("x", relax.TensorType((n, d_model), "float32"))
        gates = relax.Var("gates", relax.TensorType((n, k), "float32"))
        experts = [weight_vars(f"_{i}") for i in range(k)]
        with bb.function(fused_function(name, k), [x, gates, *(v for e in experts for v in e.values())]):
            with bb.dataflow():
                total = None
                for i, params in enumerate(experts):
                    gate = bb.emit(relax.op.strided_slice(gates, axes=[1], begin=[i], end=[i + 1]))
                    term = bb.emit(relax.op.multiply(expert(x, params), gate))
                    total = term if total is None else bb.emit(relax.op.add(total, term))
                out = bb.emit_output(total)
            bb.emit_func_output(out)
    for r in resident:
        if cpu and s.tile and gemv.fuses_resident_layer(s):
            _fused_resident_layer(bb, d_model, d_ff, s, r, specs, slot)
            continue
        # Two functions: the experts take the chosen ids as a shape parameter, so the views'
        # offsets are defined on entry (inside one dataflow block, operator fusion would reorder
        # the views before the ids that place them: it sees only data edges).
        offsets, slot_bytes = slot
        ids = [tvm.tirx.Var(f"expert{i}", "int64") for i in range(r.top_k)]
        x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
        gates = relax.Var("gates", relax.TensorType((1, r.top_k), "float32"))
        pool = relax.Var("pool", relax.TensorType((r.n_experts * slot_bytes,), "uint8"))
        chosen = relax.Var("chosen", relax.ShapeType(ids))
        # Public: Relax's RemoveUnusedParameters fails on a private function whose shape parameter
        # is used only through its symbolic values.
        with bb.function(f"{r.function}_experts", [x, gates, pool, chosen]):
            with bb.dataflow():
                total = None
                for i, e in enumerate(ids):
                    params = {p: bb.emit(relax.op.memory.view(pool, list(shape), dtype,
                                                              relax.prim_value(e * slot_bytes + offset)))
                              for (p, shape, dtype), offset in zip(specs, offsets)}
                    gate = bb.emit(relax.op.strided_slice(gates, axes=[1], begin=[i], end=[i + 1]))
                    term = bb.emit(relax.op.multiply(expert(x, params), gate))
                    total = term if total is None else bb.emit(relax.op.add(total, term))
                out = bb.emit_output(total)
            experts = bb.emit_func_output(out)
        x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
        scores = relax.Var("scores", relax.TensorType((1, r.n_experts), "float32"))
        pool = relax.Var("pool", relax.TensorType((r.n_experts * slot_bytes,), "uint8"))
        with bb.function(r.function, [x, scores, pool]):
            with bb.dataflow():
                kernel = bb.add_func(top_k_kernel(r), f"top{r.top_k}_of_{r.n_experts}")
                picked = bb.emit(relax.call_tir(kernel, [scores], [relax.TensorType((r.top_k,), "int64"),
                                                                   relax.TensorType((1, r.top_k), "float32")]))
                ids = bb.emit(relax.op.tensor_to_shape(bb.emit(relax.TupleGetItem(picked, 0))))
                out = bb.emit_output(bb.emit(relax.Call(experts, [x, bb.emit(relax.TupleGetItem(picked, 1)), pool, ids])))
            bb.emit_func_output(out)
    return bb.get()


def _fused_resident_layer(bb: relax.BlockBuilder, d_model: int, d_ff: int, s: Scheme, r: ResidentRouting,
                          specs: list, slot: tuple[list[int], int]) -> None:
    """The resident function (x (1, d), scores (1, E), pool) -> (1, d) as two kernels: top-k,
    then the whole layer (gemv.resident_layer) reading the pool and the pool viewed as scales."""
    from . import gemv

    offsets, slot_bytes = slot
    pool_bytes = r.n_experts * slot_bytes
    layer = gemv.resident_layer(d_model, d_ff, s, r.n_experts, r.top_k,
                                {name: offset for (name, _, _), offset in zip(specs, offsets)}, slot_bytes)
    scales = scale_dtype(s)  # the kernel reads the pool's scales through a view of this dtype
    x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
    scores = relax.Var("scores", relax.TensorType((1, r.n_experts), "float32"))
    pool = relax.Var("pool", relax.TensorType((pool_bytes,), "uint8"))
    with bb.function(r.function, [x, scores, pool]):
        with bb.dataflow():
            top_k = bb.add_func(top_k_kernel(r), f"top{r.top_k}_of_{r.n_experts}")
            picked = bb.emit(relax.call_tir(top_k, [scores], [relax.TensorType((r.top_k,), "int64"),
                                                              relax.TensorType((1, r.top_k), "float32")]))
            scales = bb.emit(relax.op.memory.view(pool, [pool_bytes // DTYPE_BYTES[scales]], scales, relax.prim_value(0)))
            kernel = bb.add_func(layer, f"{r.function}_layer")
            out = bb.emit(relax.call_tir(kernel, [x, bb.emit(relax.TupleGetItem(picked, 1)), bb.emit(relax.TupleGetItem(picked, 0)),
                                                  pool, scales], relax.TensorType((1, d_model), "float32")))
            out = bb.emit_output(out)
        bb.emit_func_output(out)


def quantize_expert(weights: dict[str, np.ndarray], s: Scheme) -> dict[str, np.ndarray]:
    """Kernel-layout fp32 weights {"w_gate", "w_up", "w_down"} -> the stored tensors."""
    out = {}
    for prefix, w in weights.items():
        out.update({prefix + suffix: t for suffix, t in quantize(w, s).items()})
    return out


def router_module(weight: np.ndarray, bias: np.ndarray | None, score_fn: str, s: Scheme, name: str) -> tvm.IRModule:
    """router(x (n, d) f32) -> scores (n, E) = score_fn(x @ W^T + b), weights baked in as
    constants at precision `s` (fp32 by default: routing is the most sensitive part)."""
    if score_fn not in ("softmax", "sigmoid"):
        raise QuantizationError(f"unknown router score function {score_fn!r}")
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, weight.shape[1]), "float32"))
    stored = quantize(np.ascontiguousarray(weight.T), s)
    bb = relax.BlockBuilder()
    with bb.function(name, [x]):
        with bb.dataflow():
            consts = [relax.const(stored[key]) for key in ("", ".scale", ".zero") if key in stored]
            logits = bb.emit_te(lambda a, *w: _matmul_te(a, list(w), s, "logits"), x, *consts,
                                primfunc_name_hint=f"{name}_logits")
            if bias is not None:
                logits = bb.emit(relax.op.add(logits, relax.const(np.asarray(bias, np.float32))))
            scores = relax.op.nn.softmax(logits, axis=-1) if score_fn == "softmax" else relax.op.sigmoid(logits)
            out = bb.emit_output(bb.emit(scores))
        bb.emit_func_output(out)
    return bb.get()


def kernel_layout(w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch (out, in) weights -> the kernels' (in, out) layout, fp32."""
    return {"w_gate": np.ascontiguousarray(w_gate.T, np.float32), "w_up": np.ascontiguousarray(w_up.T, np.float32),
            "w_down": np.ascontiguousarray(w_down.T, np.float32)}
