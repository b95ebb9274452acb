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
Everything else (norm scales, biases, small tables) stays a plain fp32 parameter. All of them
leave the compiler as named tensors, which the artifact stores in weight files the runtime
loads, verified, beside the libraries: the segments library holds code only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from . import quant as quantization
from .quant_kernels import gather_te, matmul_call
from .gemv import LANES, dot_fits


@dataclass
class DenseWeights:
    """`main` takes its traced inputs, then these tensors, in this order."""

    names: list[str]
    arrays: list[np.ndarray]
    scheme: quantization.Scheme
    schemes: dict[str, quantization.Scheme]  # PyTorch name -> how each quantized weight is stored (the rest stay fp32)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))


PAD = LANES  # output columns: the vector tile of the GEMV kernels (and a multiple of MatmulOuterProduct's)
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_TAKE = tvm.ir.Op.get("relax.take")


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


@relax.expr_functor.mutator
class _UseStoredWeights(relax.PyExprMutator):
    """matmul(x, permute_dims(w)) -> dequantize-matmul; take(w, ids) -> dequantizing gather; the
    transposes of quantized weights dropped."""

    def __init__(self, mod, stored: dict, cpu: bool):
        super().__init__(mod)
        self.stored, self.cpu = stored, cpu  # weight var -> (its stored vars, K, scheme)
        self.transposed: dict = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if _is_transpose(value) and value.args[0] in self.stored:
            self.transposed[binding.var] = value.args[0]
            return  # the kernels read the stored (K, N) layout directly
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        if call.op.same_as(_MATMUL) and call.args[1] in self.transposed:
            stored, _k, s = self.stored[self.transposed[call.args[1]]]
            x = self.visit_expr(call.args[0])
            y = matmul_call(self.builder_, x, stored, s, "dense", self.cpu)
            n = int(call.ty.shape.values[-1])
            if int(y.ty.shape.values[-1]) == n:  # the stored width (tiled storage hides it in two dims)
                return y
            return relax.op.strided_slice(y, axes=[y.ty.ndim - 1], begin=[0], end=[n])
        if call.op.same_as(_TAKE) and call.args[0] in self.stored:
            stored, k, s = self.stored[call.args[0]]
            ids = self.visit_expr(call.args[1])
            flat = ids if ids.ty.ndim == 1 else self.builder_.emit(relax.op.reshape(ids, [-1]))
            rows = self.builder_.emit(self.builder_.call_te(
                lambda i, *w: gather_te(i, list(w), s, k, "embedding"), flat, *stored,
                primfunc_name_hint=f"embedding_{s.tag}_gather"))
            return rows if ids.ty.ndim == 1 else relax.op.reshape(rows, [*call.args[1].ty.shape.values, k])
        return super().visit_call_(call)


def store_dense_weights(mod: tvm.IRModule, scheme: quantization.Scheme, cpu: bool = True,
                        int8_dot: bool = False) -> tuple[tvm.IRModule, DenseWeights]:
    """`mod` (main with parameters as inputs, see frontend._import) with its weights in stored
    form: linear and embedding weights at `scheme` (vocabulary tables at int8 when `scheme` is
    int4; fp32 where the input size does not fit the group size), the rest fp32; returns the
    module and the tensors `main` now takes after its inputs. cpu: matmuls use the hand-scheduled
    kernels of compiler/gemv.py (else the TE form, for GPU targets' schedules); int8_dot: the CPU
    has the integer dot products of gemv.py's int8/int4 kernels."""
    main = mod["main"]
    n_inputs = int(main.attrs["num_input"])
    weights = list(main.params[n_inputs:])
    values = dict(zip(weights, (np.asarray(v.numpy()) for v in main.attrs["params"])))
    names = dict(zip(weights, (str(n) for n in main.attrs["param_names"])))
    uses = _uses(main, weights)

    vocabularies = {values[w].shape[0] for w in weights if "embedding" in uses[w]}
    table_scheme = quantization.scheme("int8") if scheme.name == "int4" else scheme
    stored: dict = {}  # quantized weight var -> (stored vars, K, scheme)
    params, arrays, stored_names, schemes = list(main.params[:n_inputs]), [], [], {}
    for w in weights:
        array = values[w]
        kinds = uses[w]
        s = table_scheme if array.ndim == 2 and ("embedding" in kinds or array.shape[0] in vocabularies) else scheme
        # every stored width is padded to a tile
        s = s.tiled(LANES if cpu else None, cpu and int8_dot and array.ndim == 2 and dot_fits(s, array.shape[1]))
        fits = array.ndim == 2 and array.dtype == np.float32 and (s.name != "int4" or array.shape[1] % s.group_size == 0)
        if kinds and kinds <= {"linear", "embedding"} and fits:
            n = array.shape[0]
            padded = np.zeros(((n + PAD - 1) // PAD * PAD, array.shape[1]), np.float32)
            padded[:n] = array
            tensors = quantization.quantize(np.ascontiguousarray(padded.T), s)  # (K, N) = (in, out)
            vars_ = []
            for suffix, t in tensors.items():
                v = relax.Var(names[w] + suffix, relax.TensorType(t.shape, str(t.dtype)))
                vars_.append(v)
                params.append(v)
                arrays.append(t)
                stored_names.append(names[w] + suffix)
            stored[w] = (vars_, array.shape[1], s)
            schemes[names[w]] = s
        elif kinds:
            params.append(w)
            arrays.append(np.ascontiguousarray(array))
            stored_names.append(names[w])
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
    return out, DenseWeights(stored_names, arrays, scheme, schemes)
