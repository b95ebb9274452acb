"""The dense part's weights as weight files: quantized like the experts, never baked into code.

The model is traced with its parameters as inputs of `main` (frontend._import, keep_params).
Here every weight that serves only as a linear layer's matrix (`matmul(x, permute_dims(w))`, what
`nn.Linear` imports as) or as an embedding table (`take(w, ids, axis=0)`) is stored at the dense
precision in the kernel layout (K, N) = (in, out), the same layout and kernels as the experts
(quant.py): the matmul becomes one fused dequantize-matmul kernel, the lookup a dequantizing
gather of one column per token. A tied embedding / LM head is one stored tensor serving both.
Output widths that are not a multiple of the GEMV kernels' vector tile (a vocabulary of 49155) are stored
padded with zero columns and the matmul's result sliced back: a ragged tail turned the whole
LM head kernel into predicated scalar code (69 ms a token for GraniteMoE's head, 7x slower
than the same bytes in an expert kernel). At int4, the vocabulary tables (embeddings and the LM head) take int8, as llama.cpp keeps its
output tensor at 6 bits in a q4_0 file: the logits are where 4-bit error shows most.
On CPU targets, linear weights that one block multiplies the same input by (a layer's q, k and v
projections; a dense MLP's gate and up) are stored as one weight, their rows stacked, and read by
one GEMV that writes each member's output apart (gemv.matmul's parts): at batch 1 each GEMV is a
kernel launch and a parallel loop whose threads meet at its end. GraniteMoE int4s: 347 -> 299
kernel calls a token.
Everything else (norm scales, biases, small tables) stays a plain fp32 parameter. All of them
leave the compiler as named tensors, which the artifact stores in weight files the runtime
loads, verified, beside the libraries: the segments library holds code only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from . import quant as quantization
from .checkpoint import LazyTensor
from .quantized import QuantizedNumbers, identity
from .quant_kernels import gather_te, matmul_call, stacked_matmul_call
from .gemv import LANES, dot_fits


@dataclass
class DenseWeights:
    """`main` takes its traced inputs, then these tensors, in this order. Their values are made
    only when `tensors()` is read, one weight at a time (read from the model or the checkpoint,
    quantized), so a model's dense part is never held whole."""

    names: list[str]
    specs: list[tuple[tuple[int, ...], str]]  # (shape, dtype) of each stored tensor
    makers: list[Callable[..., list[np.ndarray]]]  # in order, each makes the next stored tensors (a weight's parts)
    scheme: quantization.Scheme
    schemes: dict[str, quantization.Scheme]  # PyTorch name -> how each quantized weight is stored (the rest stay fp32)
    # stored name -> token rows per slice along its first axis, for the stored tensors of a table
    # only gathered at the token ids (artifact.TensorSpec.lookup_rows)
    lookup_rows: dict[str, int] = field(default_factory=dict)

    def nbytes_of(self, i: int) -> int:
        shape, dtype = self.specs[i]
        return int(np.prod(shape)) * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_of(i) for i in range(len(self.names)))

    def tensors(self, quantized: QuantizedNumbers | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(name, stored tensor) in order, each made when reached; quantized weights' numbers
        through `quantized` (made once for every target of a compile)."""
        quantized = quantized or QuantizedNumbers(None)
        names = iter(self.names)
        for make in self.makers:
            for array in make(quantized):
                yield next(names), array


PAD = LANES  # output columns: the vector tile of the GEMV kernels (and a multiple of MatmulOuterProduct's)
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_TAKE = tvm.ir.Op.get("relax.take")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_ASTYPE = tvm.ir.Op.get("relax.astype")


def _is_transpose(call) -> bool:
    return (isinstance(call, relax.Call) and call.op.same_as(_PERMUTE)
            and (call.attrs.axes is None or [int(a) for a in call.attrs.axes] == [1, 0]))


def _bindings(func: relax.Function) -> list:
    return [b for block in func.body.blocks for b in block.bindings]


def _uses(func: relax.Function, weights: list) -> dict:
    """weight var -> how it is used: "linear" (only ever transposed into a matmul's right-hand
    side), "embedding" (a row gather), or "other"; a set per weight."""
    bindings = _bindings(func)
    transposed = {b.var: b.value.args[0] for b in bindings if _is_transpose(b.value) and b.value.args[0] in weights}
    uses: dict = {w: set() for w in weights}
    for b in bindings:
        value = b.value
        if b.var in transposed:
            continue
        for v in relax.analysis.free_vars(value):
            if v in weights:
                embedding = (isinstance(value, relax.Call) and value.op.same_as(_TAKE) and value.args[0].same_as(v)
                             and int(value.attrs.axis) == 0 and not value.args[1].same_as(v))
                uses[v].add("embedding" if embedding else "other")
            if v in transposed:
                linear = isinstance(value, relax.Call) and value.op.same_as(_MATMUL) and value.args[1].same_as(v) \
                    and not value.args[0].same_as(v)
                uses[transposed[v]].add("linear" if linear else "other")
    for v in relax.analysis.free_vars(func.body.body):  # returned as a value
        if v in uses:
            uses[v].add("other")
        elif v in transposed:
            uses[transposed[v]].add("other")
    return uses


def _token_tables(func: relax.Function, weights: list) -> set:
    """The weights gathered by row at the token ids (an LM's `main` takes them first), through
    the casts and reshapes the trace puts between: `take(w, reshape(astype(tokens)))`."""
    tokens = func.params[0]
    derived = {b.var: b.value.args[0] for b in _bindings(func)
               if isinstance(b.value, relax.Call) and (b.value.op.same_as(_RESHAPE) or b.value.op.same_as(_ASTYPE))}
    tables = set()
    for b in _bindings(func):
        value = b.value
        if isinstance(value, relax.Call) and value.op.same_as(_TAKE) and value.args[0] in weights:
            index = value.args[1]
            while index in derived:
                index = derived[index]
            if index.same_as(tokens):
                tables.add(value.args[0])
    return tables


def _siblings(func: relax.Function, candidates: set) -> list[list]:
    """Groups (2 or more, in order of use) of `candidates` that a block multiplies the same input
    by (as traced, each linear layer reshapes it to rows of its own), each weight in one matmul."""
    bindings = _bindings(func)
    transposed = {b.var: b.value.args[0] for b in bindings if _is_transpose(b.value)}
    reshaped = {b.var: b.value.args[0] for b in bindings
                if isinstance(b.value, relax.Call) and b.value.op.same_as(_RESHAPE)}
    matmuls = Counter(transposed[b.value.args[1]] for b in bindings
                      if isinstance(b.value, relax.Call) and b.value.op.same_as(_MATMUL) and b.value.args[1] in transposed)
    once = {w for w in candidates if matmuls[w] == 1}
    groups = []
    for block in func.body.blocks:
        by_input: dict = {}
        for b in block.bindings:
            value = b.value
            if isinstance(value, relax.Call) and value.op.same_as(_MATMUL) and value.args[1] in transposed \
                    and transposed[value.args[1]] in once and isinstance(value.args[0], relax.Var):
                x = value.args[0]
                by_input.setdefault(reshaped.get(x, x), []).append(transposed[value.args[1]])
        groups += [ws for ws in by_input.values() if len(ws) > 1]
    return groups


def _stacked_name(names: list[str]) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj.weight -> model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = "+".join(".".join(p[head:len(p) - tail]) for p in parts)
    return ".".join([*parts[0][:head], middle, *parts[0][len(parts[0]) - tail:]])


def _stacked(sources: list) -> LazyTensor:
    """PyTorch (out, in) weights as one, their rows stacked, each read only when its rows are."""
    starts = np.cumsum([0] + [w.shape[0] for w in sources])

    def rows(start: int, stop: int) -> np.ndarray:
        out = []
        for w, first, end in zip(sources, starts[:-1], starts[1:]):
            a, b = max(start, first), min(stop, end)
            if a < b:
                out.append(w.rows(a - first, b - first) if hasattr(w, "rows") else np.asarray(w[a - first:b - first]))
        return np.concatenate(out).astype(np.float32, copy=False)

    return LazyTensor((int(starts[-1]), sources[0].shape[1]), lambda: rows(0, int(starts[-1])),
                      lambda: "stacked:" + ",".join(identity(w) for w in sources), rows)


@relax.expr_functor.mutator
class _UseStoredWeights(relax.PyExprMutator):
    """matmul(x, permute_dims(w)) -> dequantize-matmul; take(w, ids) -> dequantizing gather; the
    transposes of quantized weights dropped."""

    def __init__(self, mod, stored: dict, cpu: bool):
        super().__init__(mod)
        # weight var -> (its stored vars, K, scheme, (its place, the widths) in a stacked weight or None)
        self.stored, self.cpu = stored, cpu
        self.transposed: dict = {}
        self.products: dict = {}  # a stacked weight's first stored var -> its GEMV's outputs

    def visit_var_binding_(self, binding):
        value = binding.value
        if _is_transpose(value) and value.args[0] in self.stored:
            self.transposed[binding.var] = value.args[0]
            return  # the kernels read the stored (K, N) layout directly
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        if call.op.same_as(_MATMUL) and call.args[1] in self.transposed:
            stored, _k, s, part = self.stored[self.transposed[call.args[1]]]
            x = self.visit_expr(call.args[0])
            if part is not None:
                if stored[0] not in self.products:
                    self.products[stored[0]] = stacked_matmul_call(self.builder_, x, stored, s, part[1])
                return self.products[stored[0]][part[0]]
            y = matmul_call(self.builder_, x, stored, s, "dense", self.cpu)
            n = int(call.ty.shape.values[-1])
            if int(y.ty.shape.values[-1]) == n:  # the stored width (tiled storage hides it in two dims)
                return y
            return relax.op.strided_slice(y, axes=[y.ty.ndim - 1], begin=[0], end=[n])
        if call.op.same_as(_TAKE) and call.args[0] in self.stored:
            stored, k, s, _part = self.stored[call.args[0]]
            ids = self.visit_expr(call.args[1])
            flat = ids if ids.ty.ndim == 1 else self.builder_.emit(relax.op.reshape(ids, [-1]))
            rows = self.builder_.emit(self.builder_.call_te(
                lambda i, *w: gather_te(i, list(w), s, k, "embedding"), flat, *stored,
                primfunc_name_hint=f"embedding_{s.tag}_gather"))
            return rows if ids.ty.ndim == 1 else relax.op.reshape(rows, [*call.args[1].ty.shape.values, k])
        return super().visit_call_(call)


def store_dense_weights(mod: tvm.IRModule, scheme: quantization.Scheme, cpu: bool = True, dot: tuple[str, ...] = (),
                        sources: dict | None = None, vnni: bool = True) -> tuple[tvm.IRModule, DenseWeights]:
    """`mod` (main with parameters as inputs, see frontend._import) with its weights in stored
    form: linear and embedding weights at `scheme` (vocabulary tables at int8 when `scheme` is
    int4; fp32 where the input size does not fit the group size), the rest fp32; returns the
    module and the tensors `main` now takes after its inputs. cpu: matmuls use the hand-scheduled
    kernels of compiler/gemv.py (else the TE form, for GPU targets' schedules); dot: the
    precisions (int8, int4) for which the CPU has gemv.py's integer-dot kernels; vnni: whether
    their dots are AVX512-VNNI's (else AVX2's, Scheme.vnni). sources: PyTorch name -> the
    weight's values where they are not the traced module's own (a streamed checkpoint's
    `LazyTensor`s, compiler/checkpoint.py); read, like the rest, only when the tensors are."""
    main = mod["main"]
    n_inputs = int(main.attrs["num_input"])
    weights = list(main.params[n_inputs:])
    names = dict(zip(weights, (str(n) for n in main.attrs["param_names"])))
    traced = dict(zip(weights, main.attrs["params"]))
    shapes = {w: tuple(int(d) for d in w.ty.shape.values) for w in weights}
    uses = _uses(main, weights)

    def value(w):
        """The weight's values, or its checkpoint tensor (read in row blocks by `_quantized`)."""
        source = (sources or {}).get(names[w])
        return source if source is not None else traced[w].numpy()

    vocabularies = {shapes[w][0] for w in weights if "embedding" in uses[w]}
    table_scheme = quantization.scheme("int8") if scheme.name == "int4" else scheme
    stored_scheme: dict = {}  # weight var -> its scheme, for the weights stored at one
    for w in weights:
        shape, kinds = shapes[w], uses[w]
        s = table_scheme if len(shape) == 2 and ("embedding" in kinds or shape[0] in vocabularies) else scheme
        # every stored width is padded to a tile
        s = s.tiled(LANES if cpu else None, cpu and s.name in dot and len(shape) == 2 and dot_fits(s, shape[1]), vnni)
        fits = len(shape) == 2 and w.ty.dtype == "float32" and (s.name != "int4" or shape[1] % s.group_size == 0)
        if kinds and kinds <= {"linear", "embedding"} and fits:
            stored_scheme[w] = s
    # Stacked on CPU targets, where gemv.py's kernel stores each member's output apart (a slice
    # per member would be a copy kernel), and where no member needs padding.
    candidates = {w for w, s in stored_scheme.items() if uses[w] == {"linear"} and shapes[w][0] % PAD == 0} if cpu else set()
    groups = [[w for w in group if stored_scheme[w] == s] for group in _siblings(main, candidates)
              for s in dict.fromkeys(stored_scheme[w] for w in group)]
    stacks = {group[0]: group for group in groups if len(group) > 1}
    stacked = {w for group in stacks.values() for w in group}
    stored: dict = {}  # quantized weight var -> (stored vars, K, scheme, (place, widths) if stacked)
    params, makers, stored_names, specs, schemes = list(main.params[:n_inputs]), [], [], [], {}
    # Tables read only at the token ids (an untied input embedding), stored in tiles of token rows:
    # a runtime may hold just the tiles of the tokens it has seen (each tiled part, not 1-D scales).
    lookups = {w for w in _token_tables(main, weights) if uses[w] == {"embedding"}}
    lookup_rows: dict[str, int] = {}
    for w in weights:
        if w in stacked and w not in stacks:
            continue  # stored with its stack, at the stack's first member
        shape, kinds = shapes[w], uses[w]
        if w in stored_scheme:
            s, members = stored_scheme[w], stacks.get(w, [w])
            name = _stacked_name([names[m] for m in members]) if len(members) > 1 else names[w]
            n = sum(shapes[m][0] for m in members)
            padded_n = (n + PAD - 1) // PAD * PAD
            vars_ = []
            for part, stored_shape, dtype in quantization.weight_params(name, shape[1], padded_n, s):
                vars_.append(relax.Var(part, relax.TensorType(stored_shape, dtype)))
                stored_names.append(part)
                specs.append((tuple(stored_shape), dtype))
                if w in lookups and s.tile and len(stored_shape) == 3:
                    lookup_rows[part] = s.tile
            params.extend(vars_)
            source = (lambda members=members: _stacked([value(m) for m in members])) if len(members) > 1 \
                else (lambda w=w: value(w))
            makers.append(lambda quantized, source=source, s=s, padded_n=padded_n: _stored(quantized, source(), padded_n, s))
            widths = tuple(shapes[m][0] for m in members)
            for place, m in enumerate(members):
                stored[m] = (vars_, shape[1], s, (place, widths) if len(members) > 1 else None)
                schemes[names[m]] = s
        elif kinds:
            params.append(w)
            makers.append(lambda _quantized, w=w: [np.ascontiguousarray(np.asarray(value(w)))])
            stored_names.append(names[w])
            specs.append((shape, str(w.ty.dtype)))
        # an unused parameter is dropped
    func = relax.Function(params, main.body, main.ret_ty, main.is_pure, main.attrs)
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, f in mod.functions_items():
        out[gv] = f
    rewrite = _UseStoredWeights(out, stored, cpu)
    new_main = rewrite.visit_expr(func)
    out = rewrite.builder_.get()  # the mutator's module: every PrimFunc it added
    out["main"] = new_main.without_attr("params").without_attr("param_names")
    out = relax.transform.DeadCodeElimination(["main"])(out)
    return out, DenseWeights(stored_names, specs, makers, scheme, schemes, lookup_rows)


ROW_BLOCK = 4096  # outputs quantized at once: bounds the working set of a vocabulary table


def _stored(quantized, weight, padded_n: int, s: quantization.Scheme) -> list[np.ndarray]:
    """A PyTorch (out, in) weight's stored tensors at `s`: its numbers in the plain layout of
    s's precision, made once for every target (`quantized`), laid out for this one ROW_BLOCK
    outputs at a time (tiles never straddle blocks: ROW_BLOCK is a multiple of every tile)."""
    precision = s.plain
    plain = quantized.get(lambda: ["dense", identity(weight), padded_n, precision.tag],
                          lambda: _quantized(weight, padded_n, precision))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, padded_n, ROW_BLOCK):
        block = {suffix: a[..., start:start + ROW_BLOCK] for suffix, a in plain.items()}
        for suffix, a in quantization.relayout(block, s).items():
            parts.setdefault(suffix, []).append(a)
    # the output axis: first in tiled storage (N / tile, ...) and of 1-D scales, else the last
    return [np.concatenate(blocks, axis=0 if s.tile or blocks[0].ndim == 1 else blocks[0].ndim - 1)
            for blocks in parts.values()]


def _quantized(weight, padded_n: int, s: quantization.Scheme) -> dict[str, np.ndarray]:
    """A PyTorch (out, in) weight padded to `padded_n` outputs, in the kernel layout (K, N) =
    (in, out), quantized at `s` (a plain layout), ROW_BLOCK outputs at a time (scales are per
    output, groups run along the input: blocks of outputs quantize independently), so a 50k x
    2048 table never has its fp32 copies made whole; a checkpoint tensor is read block by block."""
    n, k = weight.shape
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, padded_n, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, padded_n)
        block = np.zeros((stop - start, k), np.float32)
        if start < n:
            rows = weight.rows(start, min(stop, n)) if hasattr(weight, "rows") else weight[start:min(stop, n)]
            block[: rows.shape[0]] = rows
        for suffix, a in quantization.quantize(np.ascontiguousarray(block.T), s).items():
            parts.setdefault(suffix, []).append(a)
    return {suffix: np.concatenate(blocks, axis=blocks[0].ndim - 1) for suffix, blocks in parts.items()}
