"""Relax -> kernel libraries for a deploy target."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import MutableSet
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi
import tvm.relax.utils
from tvm import relax, tirx
from tvm.support import cc
from tvm.sym.analyzer import Analyzer

from moetvm.targets import DeployTarget, TargetError

from .cuda_driver import cuda_runtime_loaded
from .build_target import BuildTarget
from .schedules import CPU_TIR_PIPELINE, default_cpu_schedule


def relax_pipeline(target: tvm.target.Target, tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """TVM's own pipeline, with our default CPU schedules inserted after legalization (the
    CUDA pipeline already applies dlight's GPU schedules); `tuned` (a tuning database pass)
    schedules the kernels it has records for first, the defaults take the rest. Both are made
    deterministic (see "reproducible builds" below)."""
    if target.kind.name == "llvm":
        from tvm.relax.backend.cpu_generic import pipeline as backend

        schedules = ([tuned] if tuned is not None else []) + [default_cpu_schedule()]
    elif target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend

        schedules = []  # dlight's, in the backend's legalize passes
    else:
        return tvm.transform.Sequential([relax.get_default_pipeline(target), canonical_shape_funcs])

    @tvm.transform.module_pass(opt_level=0, name="MoetvmPipeline")
    def pipeline(mod, _ctx):
        with target:
            passes = (
                until_scheduling(backend, target)
                + schedules
                + dataflow_lower_passes(backend, target)
                + backend.finalize_passes(target)
                + [canonical_shape_funcs]
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def until_scheduling(backend, target: tvm.target.Target) -> list:
    """The pipeline's passes before kernels are scheduled (library dispatch, then legalisation
    and fusion in canonical form): the one definition the compile and tuning both lower with."""
    return backend.library_dispatch_passes(target) + legalize_passes(backend, target)


def lower_until_scheduling(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """A Relax module as a CPU build has it right before scheduling (build_library converts to
    dataflow first, as here): the kernels tuning extracts are the kernels the compile builds."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    mod = relax.transform.ConvertToDataflow()(mod)
    with target:
        return tvm.transform.Sequential(until_scheduling(cpu, target))(mod)


def legalize_passes(backend, target: tvm.target.Target) -> list:
    """`backend.legalize_passes(target)` (a tvm.relax.backend pipeline module), with the fused
    functions put in canonical form right after FuseOps and the kernels right after FuseTIR
    (`canonical_fusion`, `canonical_kernels`)."""
    passes = [drop_identity_layout, rms_norm_as_one_op]
    if target.kind.name == "llvm":  # the CPU kernels store each output once (gemv.py)
        passes.append(residual_into_kernels)
    for p in backend.legalize_passes(target):
        if p.info.name == "LegalizeOps":
            # A reshape is a view of a compact tensor: it stays a Relax op, which VMBuiltinLower
            # turns into vm.builtin.reshape (what RewriteDataflowReshape would do, but its
            # pattern check fails on symbolic shapes, e.g. (b, 4, s19 + s18, 32) ->
            # (b * 4, s18 + s19, 32), and the reshape became a copy kernel).
            p = relax.transform.LegalizeOps(skip_ops=["relax.reshape"])
        passes.append(p)
        if p.info.name == "AnnotateTIROpPattern":
            passes.append(_opaque_arange)  # before FuseOps
        if p.info.name == "FuseOps":
            passes.append(canonical_fusion)
        elif p.info.name == "FuseTIR":
            passes.append(canonical_kernels)
    return passes


def dataflow_lower_passes(backend, target: tvm.target.Target) -> list:
    """`backend.dataflow_lower_passes(target)` with `collapse_reshapes` right after
    RewriteDataflowReshape, while the functions are still dataflow (every reshape a Relax op), and
    `drop_unused_tuples` after CallTIRRewrite."""
    passes = []
    for p in backend.dataflow_lower_passes(target):
        passes.append(p)
        if p.info.name == "RewriteDataflowReshape":
            passes.append(collapse_reshapes)
        elif p.info.name == "CallTIRRewrite":
            passes.append(drop_unused_tuples)
    return passes


@tvm.transform.module_pass(opt_level=0, name="MoetvmOpaqueArange")
def _opaque_arange(mod, _ctx):
    """`arange` kernels stay unfused: TVM 0.27's FuseTIR fails (renew_defs: VarRemapGet) on a
    group holding an arange of symbolic start and length (Llama 4's temperature-tuning
    positions, `arange(seq) + past`). An arange is a few integers per step."""
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("arange"):
            f = f.with_attr("op_pattern", 8)
        out[gv] = f
    return out


@relax.expr_functor.mutator
class _DropIdentityLayout(relax.PyExprMutator):
    """broadcast_to/reshape to a shape provably equal to the input's (torch's matmul decomposition
    emits `expand` to the same shape, spelled `s18 + s19` where the input says `s19 + s18`): the
    input itself, instead of a copy."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.analyzer = Analyzer()
        self.ops = (tvm.ir.Op.get("relax.broadcast_to"), tvm.ir.Op.get("relax.reshape"))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not any(call.op.same_as(op) for op in self.ops):
            return call
        return call.args[0] if _same_shape(self.analyzer, call.args[0], call) else call


def _same_shape(analyzer: Analyzer, a: relax.Expr, b: relax.Expr) -> bool:
    """Whether `a` and `b` have shapes provably equal, dimension by dimension."""
    sa, sb = getattr(a.ty, "shape", None), getattr(b.ty, "shape", None)
    return (isinstance(sa, relax.ShapeExpr) and isinstance(sb, relax.ShapeExpr) and len(sa.values) == len(sb.values)
            and all(analyzer.can_prove_equal(x, y) for x, y in zip(sa.values, sb.values)))


@tvm.transform.module_pass(opt_level=0, name="MoetvmDropIdentityLayout")
def drop_identity_layout(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    drop = _DropIdentityLayout(mod)
    for gv, func in mod.functions_items():
        out[gv] = drop.visit_expr(func) if isinstance(func, relax.Function) else func
    return out


@relax.expr_functor.mutator
class _CollapseReshapes(relax.PyExprMutator):
    """reshape(reshape(x, a), b) -> reshape(x, b), and a reshape to x's own shape -> x."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.analyzer = Analyzer()
        self.reshape = tvm.ir.Op.get("relax.reshape")

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(self.reshape):
            return call
        source = call.args[0]
        while isinstance(source, relax.Var):  # through reshapes and aliases (a reshape gone)
            bound = self.lookup_binding(source)
            if isinstance(bound, relax.Call) and bound.op.same_as(self.reshape):
                source = bound.args[0]
            elif isinstance(bound, relax.Var):
                source = bound
            else:
                break
        if _same_shape(self.analyzer, source, call):
            return source
        return call if source.same_as(call.args[0]) else relax.op.reshape(source, call.args[1])


@tvm.transform.module_pass(opt_level=0, name="MoetvmCollapseReshapes")
def collapse_reshapes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Each chain of reshapes becomes one reshape, or none where it comes back to the shape it
    started from. Each is a vm.builtin.reshape a call (a view object made, then freed): the one-call
    decode step took ~13 a GraniteMoE layer, chains of two and three among them (a GEMV's rows
    back to (1, 1, n), then heads, then a transpose of a unit axis), and the round trips of a
    (1, 1, d) hidden state to the (1, d) rows a kernel takes."""
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    collapse = _CollapseReshapes(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            func = relax.analysis.remove_all_unused(collapse.visit_expr(func))
        out[gv] = func
    return out


@relax.expr_functor.visitor
class _UseCounts(relax.PyExprVisitor):
    """How many times each variable is read (its definitions not counted)."""

    def __init__(self):
        super().__init__()
        self.count = {}

    def visit_var_(self, var):
        self.count[var] = self.count.get(var, 0) + 1

    def visit_dataflow_var_(self, var):
        self.count[var] = self.count.get(var, 0) + 1


@relax.expr_functor.mutator
class _DropUnusedTuples(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict):
        super().__init__(mod)
        self.uses = uses

    def visit_var_binding_(self, binding):
        if isinstance(binding.value, relax.Tuple) and not self.uses.get(binding.var):
            return  # not emitted
        super().visit_var_binding_(binding)


@relax.expr_functor.mutator
class _ItemsFromTuples(relax.PyExprMutator):
    """t[i] of a tuple built in the function -> the tuple's i-th field."""

    def visit_tuple_getitem_(self, op):
        op = super().visit_tuple_getitem_(op)
        bound = self.lookup_binding(op.tuple_value) if isinstance(op.tuple_value, relax.Var) else None
        return bound.fields[op.index] if isinstance(bound, relax.Tuple) else op


@tvm.transform.module_pass(opt_level=0, name="MoetvmDropUnusedTuples")
def drop_unused_tuples(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """A kernel of several outputs leaves, after CallTIRRewrite, a tuple of its outputs whose
    items are then taken one by one: each item becomes the output itself, and the tuple, unused,
    goes (a vm.builtin.make_tuple and its kill a call: 96 instructions a GraniteMoE decode token,
    top-k's and attention's)."""
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            func = _ItemsFromTuples(mod).visit_expr(func)
            uses = _UseCounts()
            uses.visit_expr(func)
            func = _DropUnusedTuples(mod, uses.count).visit_expr(func)
        out[gv] = func
    return out


def with_residual(kernel: tirx.PrimFunc, scale: float | None) -> tirx.PrimFunc | None:
    """`kernel` (..., out (rows, n)), one that stores each output element once and never reads it
    (gemv.STORES_OUTPUT_ONCE), as (..., residual (1, rows, n), out (1, rows, n)) storing
    residual + value * scale instead: a residual connection as the kernel's epilogue. None where
    the kernel does not say so, or holds a statement this does not know."""
    from .gemv import STORES_OUTPUT_ONCE, UnknownStatement, map_stores

    *inputs, out = kernel.params  # (TVM 0.27's tirx: a buffer parameter is the Buffer itself)
    if not (kernel.attrs and kernel.attrs.get(STORES_OUTPUT_ONCE)) or not isinstance(out, tirx.Buffer) \
            or len(out.shape) != 2:
        return None
    rows, n = out.shape
    shape = [tirx.IntImm(str(rows.ty), 1), rows, n]  # (.ty: a tirx.Var's dtype is its buffer's)
    residual, fused_out = tirx.decl_buffer(shape, out.dtype, "residual"), tirx.decl_buffer(shape, out.dtype, "out")

    def rewrite(store, _loops):
        if not store.buffer.same_as(out):
            return store
        index = [tirx.IntImm(str(store.indices[0].ty), 0), *store.indices]
        value = store.value if scale is None else store.value * tirx.FloatImm(out.dtype, scale)
        return tirx.BufferStore(fused_out, tirx.BufferLoad(residual, index) + value, index)

    try:
        body = map_stores(kernel.body, rewrite)
    except UnknownStatement:
        return None
    return tirx.PrimFunc([*inputs, residual, fused_out], body, kernel.ret_type,
                         kernel.attrs).without_attr(STORES_OUTPUT_ONCE)


@relax.expr_functor.mutator
class _ResidualIntoKernels(relax.PyExprMutator):
    """residual + reshape(kernel(...)) [* scale], residual (1, 1, n) and the kernel's output
    (1, n) static, each intermediate used once -> kernel_residual(..., residual)."""

    def __init__(self, mod: tvm.IRModule, uses: dict):
        super().__init__(mod)
        self.mod, self.uses, self.made = mod, uses, {}
        self.analyzer = Analyzer()
        self.op = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("add", "multiply", "reshape", "call_tir")}

    def _once(self, var) -> relax.Expr | None:
        """What `var` is bound to, where it has one use (this one)."""
        if not isinstance(var, relax.Var) or self.uses.get(var, 0) != 1:
            return None
        return self.lookup_binding(var)

    def _is(self, expr, name: str) -> bool:
        return isinstance(expr, relax.Call) and expr.op.same_as(self.op[name])

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if self._is(call, "add"):
            for residual, term in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                fused = self._fused(residual, term)
                if fused is not None:
                    return fused
        return call

    def _fused(self, residual, term) -> relax.Expr | None:
        rt = residual.ty
        if not (isinstance(rt, relax.TensorType) and rt.dtype == "float32" and isinstance(rt.shape, relax.ShapeExpr)
                and [_static(d) for d in rt.shape.values][:2] == [1, 1] and rt.ndim == 3):
            return None
        scale, bound = None, self._once(term)
        if self._is(bound, "multiply"):
            for value, factor in ((bound.args[0], bound.args[1]), (bound.args[1], bound.args[0])):
                if isinstance(factor, tvm.ir.expr.GenericConst) and factor.value.numpy().size == 1 \
                        and str(factor.value.dtype) == "float32":
                    scale, bound = float(factor.value.numpy()), self._once(value)
                    break
            else:
                return None
        if not self._is(bound, "reshape"):
            return None
        kernel_call = self._once(bound.args[0])
        if not self._is(kernel_call, "call_tir") or len(kernel_call.args) != 2:  # (no tir_vars)
            return None
        out_ty = kernel_call.ty
        if not (isinstance(out_ty, relax.TensorType) and isinstance(out_ty.shape, relax.ShapeExpr)
                and out_ty.dtype == "float32" and out_ty.ndim == 2 and _static(out_ty.shape.values[0]) == 1
                and self.analyzer.can_prove_equal(out_ty.shape.values[1], rt.shape.values[2])):
            return None
        gv = kernel_call.args[0]
        key = (gv.name_hint, scale)
        if key not in self.made:
            kernel = self.mod[gv]
            fused = with_residual(kernel, scale) if isinstance(kernel, tirx.PrimFunc) else None
            self.made[key] = fused and self.builder_.add_func(fused, f"{gv.name_hint}_residual")
        if self.made[key] is None:
            return None
        return relax.call_tir(self.made[key], [*kernel_call.args[1].fields, residual], rt)


def _static(d) -> int | None:
    return int(d) if isinstance(d, tirx.IntImm) else None


@tvm.transform.module_pass(opt_level=0, name="MoetvmResidualIntoKernels")
def residual_into_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """A residual connection after a CPU GEMV or a resident MoE layer (a decode step's attention
    output projection and MoE layer: `residual + out * multiplier`, GraniteMoE's, or `residual +
    out`) becomes that kernel's epilogue, writing the new residual stream (1, 1, d) itself: the
    elementwise kernel, its output's allocation and free, and the view of the kernel's rows as
    (1, 1, d) go (GraniteMoE's decode step: 48 kernel calls and ~290 VM instructions a token).
    Same arithmetic, in the same order: (value * multiplier), then + residual."""
    uses = _UseCounts()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            uses.visit_expr(func)
    mutator = _ResidualIntoKernels(mod, uses.count)
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions_items():
        out[gv] = relax.analysis.remove_all_unused(mutator.visit_expr(func)) if isinstance(func, relax.Function) else func
    made = {gv.name_hint for gv in mutator.made.values() if gv is not None}
    for gv, func in mutator.builder_.get().functions_items():
        if gv.name_hint in made:
            out[gv] = func
    return out


def _rms_norm_pattern():
    """w * (x * rsqrt(mean(x ** 2, -1) + eps)), the RMSNorm of the HF families, as torch.export
    gives it: its parts, to check before rewriting."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, w, two, eps = wildcard(), wildcard(), is_const(), is_const()
    mean = is_op("relax.mean")(is_op("relax.power")(x, two))
    scaled = is_op("relax.multiply")(x, is_op("relax.rsqrt")(is_op("relax.add")(mean, eps)))
    return is_op("relax.multiply")(w, scaled) | is_op("relax.multiply")(scaled, w), x, w, two, eps, mean


@tvm.transform.module_pass(opt_level=0, name="MoetvmRMSNormOp")
def rms_norm_as_one_op(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """An RMSNorm becomes relax's rms_norm: one kernel where FuseOps made two, as it fuses no
    elementwise producer (the square) into a reduction (the mean). GraniteMoE decodes 49 norms
    a token: 49 kernel calls, their outputs' allocations and frees fewer (the squares' round trip
    through memory too). Same arithmetic: the one sum of squares, divided by the width."""
    from tvm.relax.dpl import rewrite_call

    pattern, x, w, two, eps, mean = _rms_norm_pattern()

    def scalar(const) -> float | None:
        value = const.value.numpy()
        return float(value) if value.size == 1 else None

    def rewrite(call, m):
        xt, wt = m[x].ty, m[w].ty
        axis = [int(a) for a in m[mean].attrs.axis] if m[mean].attrs.axis is not None else None
        if not (isinstance(xt, relax.TensorType) and isinstance(wt, relax.TensorType)
                and xt.dtype == wt.dtype == "float32" and wt.ndim == 1 and xt.ndim >= 1
                and axis in ([-1], [xt.ndim - 1]) and m[mean].attrs.keepdims
                and scalar(m[two]) == 2.0 and scalar(m[eps]) is not None
                and Analyzer().can_prove_equal(wt.shape[0], xt.shape[xt.ndim - 1])):
            return call
        return relax.op.nn.rms_norm(m[x], m[w], axes=[-1], epsilon=scalar(m[eps]))

    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions_items():
        out[gv] = rewrite_call(pattern, rewrite, func) if isinstance(func, relax.Function) else func
    return out


# --- reproducible builds ----------------------------------------------------------------------
# Same model in, byte-identical libraries out. TVM 0.27 orders parts of its output by object *address*
# (Python `hash()` of a TVM object and C++ `StructuralHash` of a free TIR var are pointer hashes),
# so the generated code changed with ASLR and with whatever the process had allocated before:
#
# 1. Legalization (`relax.utils.gen_call_tir_inputs`, behind every `call_te`) collects the
#    symbolic shape vars a kernel takes as extra parameters in a `set` and emits them in its
#    iteration order: one compile gives `f(x, s18, s19, out)`, the next `f(x, s19, s18, out)`.
#    The kernels differ, so do the BlockBuilder's deduplication, the kernel count and the names.
#    Fix: that module's `set` becomes an insertion-ordered set, so the parameters come in the
#    order the shapes use them (installed at import, so tuning sees the same kernels).
# 2. FuseOps passes a fused function the symbolic vars it needs in a trailing `tir_vars: R.Shape`
#    parameter, in the order of `relax.analysis.free_symbolic_vars`: an unordered_set walk. The
#    fused kernels' scalar parameters follow it, and equal groups are merged only when it agrees.
#    Fix: `canonical_fusion` below, right after FuseOps.
#    FuseTIR, in turn, sometimes emits a fused kernel's scalar parameters in the other order even
#    from the same fused functions. Fix: `canonical_kernels`, right after FuseTIR, orders every
#    kernel's shape scalars by first use in its buffers' shapes and merges the kernels that then
#    turn out equal.
# 3. VMShapeLower emits one host `shape_func` per shape-computation point, its stores in the order
#    of an unordered_map walk; equal shape functions are merged only when the order happens to
#    match. Fix: `canonical_shape_funcs` below, the last pass of `relax_pipeline` for every target.
# Nothing else varies: the linker's build id is a hash of the contents, LLVM's debug info names
# "." as the compile directory, and export_library's temporary paths stay out of the library.


class _InsertionOrderedSet(MutableSet):
    """A set that iterates in insertion order (`set - other` keeps the left operand's order)."""

    def __init__(self, items=()):
        self._items = dict.fromkeys(items)

    def __contains__(self, item):
        return item in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def add(self, item):
        self._items[item] = None

    def discard(self, item):
        self._items.pop(item, None)

    def update(self, *iterables):
        for items in iterables:
            self._items.update(dict.fromkeys(items))

    def __repr__(self):
        return f"{type(self).__name__}({list(self._items)!r})"


def _deterministic_legalization() -> None:
    # Shadows the builtin only for code in tvm.relax.utils, where `set` serves one purpose:
    # collecting a kernel's unbound shape vars. Idempotent.
    tvm.relax.utils.set = _InsertionOrderedSet


_deterministic_legalization()


def _is_primitive(func) -> bool:
    return isinstance(func, relax.Function) and func.attrs is not None and bool(func.attrs.get("Primitive", False))


def _symbolic_params_in_order(func: relax.Function) -> list[int] | None:
    """For a fused function with a trailing `tir_vars` shape parameter: the permutation (new
    position -> old index) that lists those vars in order of first occurrence in the other
    parameters' types, then the return type; None if there is nothing to reorder."""
    if len(func.params) < 2:
        return None
    last = func.params[-1]
    values = getattr(last.ty, "values", None) if isinstance(last.ty, relax.ShapeType) else None
    if not values or len(values) < 2 or not all(isinstance(v, tirx.Var) for v in values):
        return None
    if any(v.same_as(last) for v in relax.analysis.free_vars(func.body)):
        return None  # the parameter is used as a value: leave it alone
    perm: list[int] = []
    for ty in [p.ty for p in func.params[:-1]] + [func.ret_ty]:
        for v in relax.analysis.tir_vars_in_type(ty):
            i = next((i for i, value in enumerate(values) if value.same_as(v)), None)
            if i is not None and i not in perm:
                perm.append(i)
    perm += [i for i in range(len(values)) if i not in perm]
    return None if perm == list(range(len(values))) else perm


def _fused_name(func: relax.Function, fallback: str) -> str:
    """The name FuseOps gives a group, before it is made unique: "fused" + callee names."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    name = "fused"
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return fallback
    for block in body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            if value.op.same_as(call_tir) and isinstance(value.args[0], tvm.ir.GlobalVar):
                name += "_" + value.args[0].name_hint
            elif isinstance(value.op, tvm.ir.Op):
                name += "_" + value.op.name
            elif isinstance(value.op, tvm.ir.GlobalVar):
                name += "_" + value.op.name_hint.removeprefix("fused_")
            else:
                return fallback
    return name if name != "fused" else fallback


@relax.expr_functor.visitor
class _CallOrder(relax.PyExprVisitor):
    """Names of the callees among `names`, in order of first call."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.order: dict[str, None] = {}

    def visit_call_(self, call):
        if isinstance(call.op, tvm.ir.GlobalVar) and call.op.name_hint in self.names:
            self.order.setdefault(call.op.name_hint, None)
        super().visit_call_(call)


@relax.expr_functor.mutator
class _RedirectCalls(relax.PyExprMutator):
    """Calls to renamed functions go to their new GlobalVar, the trailing shape argument permuted
    like the callee's `tir_vars` parameter."""

    def __init__(self, mod: tvm.IRModule, targets: dict[str, tuple]):
        super().__init__(mod)
        self.targets = targets

    def visit_call_(self, call):
        call = super().visit_call_(call)
        target = self.targets.get(call.op.name_hint) if isinstance(call.op, tvm.ir.GlobalVar) else None
        if target is None:
            return call
        gv, perm = target
        args = list(call.args)
        if perm is not None:
            shape = args[-1]
            assert isinstance(shape, relax.ShapeExpr), shape
            args[-1] = relax.ShapeExpr([shape.values[i] for i in perm])
        return relax.Call(gv, args, call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="MoetvmCanonicalFusion")
def canonical_fusion(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Put FuseOps' output in a canonical form: each fused function's `tir_vars` in order of
    first occurrence, equal fused functions merged, and names given the way FuseOps gives them
    ("fused_" + callee names, made unique with 1, 2, ...) in order of first call."""
    fused = {gv.name_hint: func for gv, func in mod.functions_items() if _is_primitive(func)}
    if not fused:
        return mod
    perms: dict[str, list[int] | None] = {}
    canon: dict[str, relax.Function] = {}
    for name, func in fused.items():
        perms[name] = perm = _symbolic_params_in_order(func)
        if perm is not None:
            last = func.params[-1]
            params = list(func.params[:-1]) + [relax.Var(last.name,
                                                         relax.ShapeType([last.ty.values[i] for i in perm]))]
            func = relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs)
        canon[name] = func

    order = _CallOrder(set(fused))
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and gv.name_hint not in fused:
            order.visit_expr(func)
    ordered = list(order.order) + [n for n in fused if n not in order.order]

    taken = {gv.name_hint for gv in mod.get_global_vars()} - set(fused)
    typed = relax.BlockBuilder()  # hands out GlobalVars typed for their function (callers need it)
    kept: list[tuple[relax.Function, tvm.ir.GlobalVar]] = []
    targets: dict[str, tuple] = {}
    for name in ordered:
        func = canon[name]
        gv = next((g for f, g in kept if tvm_ffi.structural_equal(f, func)), None)
        if gv is None:
            base = new = _fused_name(func, name)
            k = 0
            while new in taken:
                k += 1
                new = f"{base}{k}"
            taken.add(new)
            gv = typed.add_func(func, new)
            assert gv.name_hint == new, (gv, new)
            kept.append((func, gv))
        targets[name] = (gv, perms[name])

    return _with_replaced(mod, fused, _RedirectCalls(mod, targets), kept)


def _with_replaced(mod: tvm.IRModule, replaced, redirect, kept) -> tvm.IRModule:
    """`mod` without the functions named in `replaced`, the canonical `kept` (function, global
    var) pairs in their place, and every Relax function's calls redirected to them."""
    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions_items():
        if gv.name_hint in replaced:
            continue
        out[gv] = redirect.visit_expr(func) if isinstance(func, relax.Function) else func
    for func, gv in kept:
        out[gv] = func
    return out


def _is_buffer(param) -> bool:
    return isinstance(param.ty, tirx.buffer.BufferType)


def _kernel_scalars_in_order(func: tirx.PrimFunc) -> list | None:
    """The kernel's parameters with its scalars (shape vars) reordered by first occurrence in its
    buffer parameters' shapes; None if that is the order they have."""
    params = list(func.params)
    slots = [i for i, p in enumerate(params) if not _is_buffer(p)]
    if len(slots) < 2:
        return None
    scalars = [params[i] for i in slots]
    order: list = []
    for p in params:
        if _is_buffer(p):
            for dim in p.shape:
                for v in tirx.analysis.undefined_vars(dim, []):
                    if any(v.same_as(s) for s in scalars) and not any(v.same_as(o) for o in order):
                        order.append(v)
    order += [s for s in scalars if not any(s.same_as(o) for o in order)]
    if all(a.same_as(b) for a, b in zip(order, scalars)):
        return None
    for i, v in zip(slots, order):
        params[i] = v
    return params


@relax.expr_functor.visitor
class _KernelUses(relax.PyExprVisitor):
    """Per callee name: references in all, and as the kernel of a call_tir; call_tir callees in
    order of first call."""

    def __init__(self):
        super().__init__()
        self.refs: dict[str, int] = {}
        self.tir_calls: dict[str, int] = {}
        self.arity: dict[str, set[int]] = {}
        self.ops = (tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace"))

    def visit_global_var_(self, gv):
        self.refs[gv.name_hint] = self.refs.get(gv.name_hint, 0) + 1

    def visit_call_(self, call):
        if (any(call.op.same_as(op) for op in self.ops) and len(call.args) == 2
                and isinstance(call.args[0], tvm.ir.GlobalVar) and isinstance(call.args[1], relax.Tuple)):
            name = call.args[0].name_hint
            self.tir_calls[name] = self.tir_calls.get(name, 0) + 1
            self.arity.setdefault(name, set()).add(len(call.args[1].fields))
        super().visit_call_(call)


@relax.expr_functor.mutator
class _RedirectCallTIR(relax.PyExprMutator):
    """call_tir of a rewritten kernel: to its new GlobalVar, the arguments in its new order."""

    def __init__(self, mod: tvm.IRModule, targets: dict[str, tuple]):
        super().__init__(mod)
        self.targets = targets
        self.ops = (tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace"))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (any(call.op.same_as(op) for op in self.ops) and isinstance(call.args[0], tvm.ir.GlobalVar)):
            return call
        target = self.targets.get(call.args[0].name_hint)
        if target is None:
            return call
        gv, perm = target
        args = list(call.args[1].fields)
        if perm is not None:
            assert len(perm) == len(args), (call.args[0], perm)
            args = [args[i] for i in perm]
        return relax.Call(call.op, [gv, relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="MoetvmCanonicalKernels")
def canonical_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Put the kernels called through call_tir in a canonical form: shape scalars ordered by first
    use in the buffer shapes (the call sites' arguments permuted to match), then kernels that are
    equal merged into the first one called."""
    uses = _KernelUses()
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            uses.visit_expr(func)
    kernels = {gv.name_hint: func for gv, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc) and uses.tir_calls.get(gv.name_hint, 0) > 0
               and uses.tir_calls[gv.name_hint] == uses.refs.get(gv.name_hint)}
    if not kernels:
        return mod
    perms: dict[str, list[int] | None] = {}
    canon: dict[str, tirx.PrimFunc] = {}
    for name, func in kernels.items():
        params = _kernel_scalars_in_order(func)
        perm = None
        arity = uses.arity[name]
        if params is not None and len(arity) == 1:
            (n_args,) = arity  # call_tir passes the leading parameters (outputs are appended)
            perm = [next(j for j, old in enumerate(func.params) if old.same_as(p)) for p in params][:n_args]
            if sorted(perm) == list(range(n_args)):
                func = tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
            else:
                perm = None  # a scalar among the outputs: leave this kernel as it is
        perms[name] = perm
        canon[name] = func

    typed = relax.BlockBuilder()  # hands out GlobalVars typed for their function
    kept: list[tuple[tirx.PrimFunc, tvm.ir.GlobalVar]] = []
    targets: dict[str, tuple] = {}
    ordered = [n for n in uses.tir_calls if n in kernels]
    for name in ordered:
        func = canon[name]
        gv = next((g for f, g in kept if tvm_ffi.structural_equal(f, func)), None)
        if gv is None:
            gv = typed.add_func(func, name)
            assert gv.name_hint == name, (gv, name)
            kept.append((func, gv))
        targets[name] = (gv, perms[name])

    return _with_replaced(mod, kernels, _RedirectCallTIR(mod, targets), kept)


_SHAPE_FUNC_NAME = re.compile(r"shape_func\d*")


def _shape_func_stores(func) -> list | None:
    """The stores of a VMShapeLower shape function (`H[i] = <expr of H[j]>`, one per computed
    slot, each reading only slots of shape vars, none written here), or None if `func` is not one."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 1:
        return None
    body = func.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    if not all(isinstance(s, tirx.BufferStore) and len(s.indices) == 1 and isinstance(s.indices[0], tirx.IntImm)
               for s in stmts):
        return None
    if len({int(s.indices[0]) for s in stmts}) != len(stmts):
        return None
    return stmts


@relax.expr_functor.mutator
class _RenameGlobals(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, renames: dict[str, tvm.ir.GlobalVar]):
        super().__init__(mod)
        self.renames = renames

    def visit_global_var_(self, op):
        return self.renames.get(op.name_hint, op)


@tvm.transform.module_pass(opt_level=0, name="MoetvmCanonicalShapeFuncs")
def canonical_shape_funcs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Put VMShapeLower's shape functions in a canonical form: stores sorted by slot (they are
    independent: each computes one slot from shape-var slots only), equal functions merged and
    named shape_func, shape_func1, ... in the order of their (deterministic) text."""
    found = {}
    symbols = False  # after AttachGlobalSymbol (the CUDA pipeline): symbol = name, set again below
    for gv, func in mod.functions_items():
        stmts = _shape_func_stores(func) if _SHAPE_FUNC_NAME.fullmatch(gv.name_hint) else None
        if stmts is not None:
            stmts.sort(key=lambda s: int(s.indices[0]))
            if func.attrs is not None and "global_symbol" in func.attrs:
                symbols = True
                func = func.without_attr("global_symbol")
            found[gv.name_hint] = func.with_body(stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts))
    if not found:
        return mod
    unique: list = []  # canonical functions, first of each equivalence class
    cls_of: dict[str, int] = {}
    for name, func in found.items():
        for i, other in enumerate(unique):
            if tvm_ffi.structural_equal(func, other):
                cls_of[name] = i
                break
        else:
            cls_of[name] = len(unique)
            unique.append(func)
    order = sorted(range(len(unique)), key=lambda i: unique[i].script())
    taken = {gv.name_hint for gv in mod.get_global_vars()} - set(found)
    new_gvs: dict[int, tvm.ir.GlobalVar] = {}
    typed = relax.BlockBuilder()  # hands out GlobalVars typed for their function (callers need it)
    k = 0
    for i in order:
        while (name := "shape_func" + (str(k) if k else "")) in taken:
            k += 1
        k += 1
        new_gvs[i] = typed.add_func(unique[i], name)
        assert new_gvs[i].name_hint == name, (new_gvs[i], name)
    renames = {name: new_gvs[i] for name, i in cls_of.items()}

    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    rename = _RenameGlobals(mod, renames)
    for gv, func in mod.functions_items():
        if gv.name_hint in found:
            continue
        if isinstance(func, relax.Function):
            func = rename.visit_expr(func)
        out[gv] = func
    for i, gv in new_gvs.items():
        out[gv] = unique[i].with_attr("global_symbol", gv.name_hint) if symbols else unique[i]
    return out


@contextmanager
def _cuda_via_nvcc():
    # TVM's default CUDA path is NVRTC through the `cuda-bindings` package; without it TVM
    # silently ships CUDA *source*. nvcc gives a fatbin with sm_XX cubin + PTX: real device code.
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


def build_library(mod: tvm.IRModule, target: str | DeployTarget | BuildTarget, path: Path,
                  tuned: tvm.transform.Pass | None = None) -> tuple[list[str], dict]:
    """Compile every Relax function of `mod` into one shared library at `path`; `tuned`: a
    tuning database's pass (tuning.apply_database, CPU targets), which schedules the kernels it
    has records for.

    Returns the function names and facts about the code: for CUDA, kernel count and the smallest
    thread block (so a one-thread fallback kernel cannot slip through unnoticed); with a tuning
    database, how many kernels took tuned schedules."""
    target = BuildTarget.resolve(target)  # (a compile resolves it once, for all its libraries)
    compiler, tgt = target.cross_compiler, target.tvm
    mod = relax.transform.ConvertToDataflow()(mod)
    info: dict = {}
    if tgt.kind.name == "cuda":
        if shutil.which("nvcc") is None:
            raise TargetError(f"target {target.name!r} needs nvcc (the CUDA toolkit) on PATH to build device code")
        if not cuda_runtime_loaded():
            raise TargetError(
                f"target {target.name!r}: TVM's CUDA runtime library is not loaded, so TVM would ship CUDA "
                "source instead of device code; import moetvm.compiler before tvm (see compiler/cuda_driver.py)"
            )
        with _cuda_via_nvcc(), tgt:  # nvcc takes the arch (sm_XX) from the current target
            executable = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt))
        info = _cuda_kernel_info(executable)
    else:
        executable = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt, tuned),
                                 tir_pipeline=CPU_TIR_PIPELINE if tgt.kind.name == "llvm" else "default")
        if tuned is not None:
            info["tuning"] = tuned.stats.as_dict()
    if compiler:
        executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    else:
        executable.export_library(str(path))
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)], info


def _cuda_kernel_info(executable) -> dict:
    sources = []

    def walk(module):
        if module.kind == "cuda":
            sources.append(str(module.inspect_source("")))
        for sub in module.imports:
            walk(sub)

    walk(executable.mod)
    bounds = [int(b) for src in sources for b in re.findall(r"__launch_bounds__\((\d+)\)", src)]
    kernels = sum(src.count("__global__") for src in sources)
    return {"cuda_kernels": kernels, "min_threads_per_block": min(bounds) if bounds else None}
