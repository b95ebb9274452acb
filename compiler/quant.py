"""Weight-only quantization of experts and of the dense part's linear layers and embedding
table (compiler/dense_weights.py), with dequantization fused into the matmul kernels.

Weights are stored in the kernel layout (in, out) = (K, N); activations stay fp32 and every
product accumulates in fp32. Schemes:

  fp32  plain weights.
  fp16  half-precision storage.
  bf16  bfloat16 storage (fp32's range, 8 significant bits): what most checkpoints hold, kept as
        is; the kernels widen each weight to fp32 (a 16-bit shift) before the product.
  int8  symmetric, one fp32 scale per output channel:  w[k, n] = q[k, n] * scale[n].
  int4  asymmetric, group-wise along K (groups of `group_size` input rows share a scale and a
        zero point per output channel), two values per byte (low nibble = even k):
        w[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n].
        Symmetric (`Scheme.symmetric`, compile --int4-symmetric): no zero points, the zero is 8,
        llama.cpp's q4_0 (and MLC-LLM's q4f16_1): w[k, n] = (q[k, n] - 8) * scale[k // G, n], the
        scale the group's largest-magnitude weight over -8 (that weight exact). 4.5 bits a weight
        at G = 32 against 4.75; relative RMS error on Gaussian weights 0.086 against 0.081.

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

This module is the storage format and its NumPy reference (no TVM): the kernels that read it are
built by compiler/quant_kernels.py and compiler/gemv.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from moetvm.artifact import QUANT_SCHEMES
from moetvm.errors import MoetvmError

SCHEMES = QUANT_SCHEMES
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLOATS = tuple(FLOAT_DTYPES)  # stored as plain numbers: no scales, no packing
DEFAULT_GROUP_SIZE = 32


class QuantizationError(MoetvmError, ValueError):
    """An unusable quantization request (scheme, group size, shapes)."""


@dataclass(frozen=True)
class Scheme:
    name: str  # one of SCHEMES
    group_size: int | None = None  # int4 only
    tile: int | None = None  # stored tile-major (N / tile, rows, tile), see above
    dot: bool = False  # tiles dot-interleaved for integer dot products, see above
    # The CPU has AVX512-VNNI: with dot, its 4-byte dots (else AVX2's, int4 only; gemv._dot_avx2);
    # without, AVX-512's 32 registers, where the fp32-product GEMVs pair rows (gemv.float_rows_together).
    vnni: bool = True
    symmetric: bool = False  # int4 only: no zero points (the zero is SYMMETRIC_ZERO), see above

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise QuantizationError(f"unknown quantization {self.name!r}; choose from {', '.join(SCHEMES)}")
        if self.name == "int4" and (self.group_size is None or self.group_size <= 0 or self.group_size % 2):
            raise QuantizationError(f"int4 needs a positive even group size, got {self.group_size}")
        if self.dot and (self.name not in ("int8", "int4") or not self.tile):
            raise QuantizationError(f"dot-interleaved storage needs int8 or int4 in tiles, got {self.tag}")
        if self.symmetric and self.name != "int4":
            raise QuantizationError(f"symmetric storage is an int4 format, not {self.name}")
        if self.dot and not self.vnni and self.name != "int4":
            raise QuantizationError(f"{self.tag}: integer dots without VNNI are exact for int4 only")

    @property
    def tag(self) -> str:
        return self.precision + (f"t{self.tile}" if self.tile else "") + ("d" if self.dot else "")

    @property
    def precision(self) -> str:
        """The tag without the storage layout: what the numbers are, not how they are laid out."""
        return f"int4g{self.group_size}" + ("s" if self.symmetric else "") if self.name == "int4" else self.name

    def tiled(self, tile: int | None, dot: bool = False, vnni: bool = True) -> "Scheme":
        return Scheme(self.name, self.group_size, tile, dot, vnni, self.symmetric)

    @property
    def plain(self) -> "Scheme":
        """The same numbers without a storage layout (what `quantize` makes before relayout)."""
        return Scheme(self.name, self.group_size, symmetric=self.symmetric)

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


def scheme(name: str, group_size: int | None = None, int4_symmetric: bool = False) -> Scheme:
    """The scheme `name`; int4_symmetric applies to int4 alone (other names ignore it)."""
    int4 = name == "int4"
    return Scheme(name, (group_size or DEFAULT_GROUP_SIZE) if int4 else None, symmetric=int4 and int4_symmetric)


SYMMETRIC_ZERO = 8  # a symmetric int4 weight's stored value for 0


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
        if w.size and np.abs(w).max() > np.finfo(np.float16).max:
            raise QuantizationError(f"a weight of magnitude {np.abs(w).max():.3g} exceeds fp16's range "
                                    f"({np.finfo(np.float16).max:.0f}): store it as bf16, fp32, int8 or int4")
        out = {"": w.astype(np.float16)}
    elif s.name == "bf16":
        out = {"": w.astype(ml_dtypes.bfloat16)}  # round to nearest even
    elif s.name == "int8":
        scale = np.abs(w).max(axis=0) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        out = {"": q, ".scale": scale}
    elif s.symmetric:
        g = w.reshape(w.shape[0] // s.group_size, s.group_size, w.shape[1])
        extreme = np.take_along_axis(g, np.abs(g).argmax(axis=1)[:, None], axis=1)[:, 0]
        scale = (extreme / -SYMMETRIC_ZERO).astype(np.float16)  # the extreme weight stored as 0
        d = scale.astype(np.float32)
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip(np.rint(g * inv[:, None]) + SYMMETRIC_ZERO, 0, 15).reshape(w.shape)
        out = {"": pack_int4(q), ".scale": scale}
    else:
        g = w.reshape(w.shape[0] // s.group_size, s.group_size, w.shape[1])
        lo, hi = g.min(axis=1), g.max(axis=1)
        scale = (hi - lo) / 15.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(g / scale.astype(np.float32)[:, None]) + zero[:, None], 0, 15).reshape(w.shape)
        out = {"": pack_int4(q), ".scale": scale, ".zero": zero}
    return relayout(out, s)


def relayout(plain: dict[str, np.ndarray], s: Scheme) -> dict[str, np.ndarray]:
    """Stored tensors in the plain layout of s's precision (what `quantize` gives without tile or
    dot) -> the same numbers in s's layout, exactly as `quantize(w, s)` stores them: one
    quantization serves every target's layout. Returned in `weight_params`' order."""
    out = {suffix: plain[suffix] for suffix in ("", ".scale", ".zero") if suffix in plain}
    if not s.tile:
        return out
    if s.dot:
        values = plain[""] if s.name == "int8" else unpack_int4(plain[""])
        out[""] = _dot_interleave(values, s)
    return {suffix: a if s.dot and suffix == "" else _tile(a, s.tile) for suffix, a in out.items()}


def dequantize(t: dict[str, np.ndarray], s: Scheme) -> np.ndarray:
    """The reference: the fp32 weights a quantized tensor stands for."""
    values = _dot_deinterleave(t[""], s) if s.dot else None
    t = {suffix: _untile(a, s.tile) for suffix, a in t.items()}
    if s.name in FLOATS:
        return t[""].astype(np.float32)
    if s.name == "int8":
        return (t[""] if values is None else values).astype(np.float32) * t[".scale"]
    q = (unpack_int4(t[""]) if values is None else values).astype(np.float32)
    groups = np.repeat(np.arange(q.shape[0] // s.group_size), s.group_size)
    zero = np.float32(SYMMETRIC_ZERO) if s.symmetric else t[".zero"][groups].astype(np.float32)
    return (q - zero) * t[".scale"][groups].astype(np.float32)


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


def weight_params(prefix: str, k: int, n: int, s: Scheme) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of the tensors stored for one (k, n) weight, in call order."""
    if s.name in FLOATS:
        plain = [(prefix, (k, n), FLOAT_DTYPES[s.name])]
    elif s.name == "int8":
        plain = [(prefix, (k, n), "int8"), (prefix + ".scale", (n,), "float32")]
    else:
        groups = k // s.group_size
        plain = [(prefix, (k // 2, n), "uint8"), (prefix + ".scale", (groups, n), "float16")]
        if not s.symmetric:
            plain.append((prefix + ".zero", (groups, n), "uint8"))
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


SWIGLU = "swiglu"  # down(silu(x @ gate) * (x @ up))
CLAMPED = "clampedswiglu"  # GPT-OSS: biases, gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha gate)
PLAIN = "mlp"  # no gate: down(act(x @ up)) (NemotronH: relu^2), optionally with biases
BIASES = ("b_gate", "b_up", "b_down")  # a clamped expert's fp32 biases, stored after its weights
PLAIN_BIASES = ("b_up", "b_down")  # a plain expert's, when it has them
# A plain expert's activation (its name in the kind) -> NumPy reference; the kernels' are in
# quant_kernels.PLAIN_ACTIVATIONS.
ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0),
    "relu2": lambda h: np.square(np.maximum(h, 0)),
    "gelu": lambda h: 0.5 * h * (1 + _erf(h / np.sqrt(2))),
    "gelutanh": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3))),
    "silu": lambda h: h / (1 + np.exp(-h)),
}


def _erf(x):
    from math import erf

    return np.vectorize(erf, otypes=[np.float64])(x).astype(np.asarray(x).dtype)


def clamped_kind(alpha: float, limit: float) -> str:
    """The workload kind of a clamped SwiGLU expert: its constants are part of the kernel."""
    return f"{CLAMPED}_a{alpha!r}_l{limit!r}".replace(".", "p").replace("-", "m")


def plain_kind(activation: str, biases: bool) -> str:
    """The workload kind of a plain (gateless) MLP expert: its activation, and whether it has biases."""
    if activation not in ACTIVATIONS:
        raise QuantizationError(f"unknown expert activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    return f"{PLAIN}_{activation}" + ("_bias" if biases else "")


def parse_kind(kind: str) -> tuple[str, dict]:
    """(name, constants) of an expert kind: (SWIGLU, {}), (CLAMPED, {alpha, limit}) or (PLAIN,
    {activation, biases})."""
    if kind == SWIGLU:
        return SWIGLU, {}
    name, *fields = kind.split("_")
    if name == PLAIN and fields and fields[0] in ACTIVATIONS and fields[1:] in ([], ["bias"]):
        return PLAIN, {"activation": fields[0], "biases": fields[1:] == ["bias"]}
    if name != CLAMPED or len(fields) != 2 or fields[0][:1] != "a" or fields[1][:1] != "l":
        raise QuantizationError(f"unknown expert kind {kind!r}")
    number = lambda text: float(text[1:].replace("p", ".").replace("m", "-"))  # noqa: E731
    return CLAMPED, {"alpha": number(fields[0]), "limit": number(fields[1])}


def projections(kind: str) -> tuple[str, ...]:
    """The weight matrices of an expert of `kind`, in storage order."""
    return ("w_up", "w_down") if parse_kind(kind)[0] == PLAIN else ("w_gate", "w_up", "w_down")


def bias_names(kind: str) -> tuple[str, ...]:
    """The fp32 biases an expert of `kind` stores after its weights (none for SwiGLU)."""
    name, constants = parse_kind(kind)
    return BIASES if name == CLAMPED else PLAIN_BIASES if constants.get("biases") else ()


def expert_params(d_model: int, d_ff: int, s: Scheme, kind: str = SWIGLU) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of each tensor an expert of `kind` stores at `s`, in order."""
    s.check(d_model)
    s.check(d_ff)
    sizes = {"w_gate": (d_model, d_ff), "w_up": (d_model, d_ff), "w_down": (d_ff, d_model)}
    bias_sizes = {"b_gate": d_ff, "b_up": d_ff, "b_down": d_model}
    return ([p for name in projections(kind) for p in weight_params(name, *sizes[name], s)]
            + [(b, (bias_sizes[b],), "float32") for b in bias_names(kind)])


def quantize_expert(weights: dict[str, np.ndarray], s: Scheme) -> dict[str, np.ndarray]:
    """Kernel-layout fp32 weights {"w_gate" (gated kinds), "w_up", "w_down"} (and biases, kept
    fp32) -> the stored tensors."""
    out = {}
    for prefix, w in weights.items():
        if prefix.startswith("b_"):
            out[prefix] = np.ascontiguousarray(w, np.float32)
            continue
        out.update({prefix + suffix: t for suffix, t in quantize(w, s).items()})
    return out


def relayout_expert(plain: dict[str, np.ndarray], s: Scheme) -> dict[str, np.ndarray]:
    """`quantize_expert`'s tensors in the plain layout of s's precision -> s's layout."""
    out = {}
    for prefix in ("w_gate", "w_up", "w_down"):
        parts = {name[len(prefix):]: a for name, a in plain.items() if name.startswith(prefix)}
        if parts:
            out.update({prefix + suffix: t for suffix, t in relayout(parts, s).items()})
    return out | {b: a for b, a in plain.items() if b.startswith("b_")}


def kernel_layout(w_gate: np.ndarray | None, w_up: np.ndarray, w_down: np.ndarray,
                  biases: tuple | None = None, kind: str = SWIGLU) -> dict[str, np.ndarray]:
    """PyTorch (out, in) weights (arrays, or checkpoint tensors read here) -> the kernels' (in,
    out) layout, fp32 (w_gate None for the plain kind); biases (`bias_names(kind)`) as they are."""
    out = {name: np.ascontiguousarray(np.asarray(w, np.float32).T)
           for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)) if w is not None}
    names = bias_names(kind)
    if len(biases or ()) != len(names):
        raise QuantizationError(f"an expert of kind {kind!r} has {len(names)} biases, not {len(biases or ())}")
    return out | {b: np.asarray(v, np.float32) for b, v in zip(names, biases or ())}
