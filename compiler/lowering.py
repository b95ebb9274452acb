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

from moetvm.targets import DeployTarget, TargetError

from .cuda_driver import cuda_runtime_loaded
from .schedules import default_cpu_schedule


def tvm_target(target: DeployTarget) -> tvm.target.Target:
    if target.host:
        return tvm.target.Target(target.tvm_target, target.host)
    return tvm.target.Target(target.tvm_target)


def relax_pipeline(target: tvm.target.Target, tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """TVM's own pipeline, with our default CPU schedules inserted after legalization (the
    CUDA pipeline already applies dlight's GPU schedules); `tuned` (a tuning database pass)
    schedules the kernels it has records for first, the defaults take the rest."""
    if target.kind.name != "llvm":
        return tvm.transform.Sequential([relax.get_default_pipeline(target), canonical_shape_funcs])
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="MoetvmCPUPipeline")
    def pipeline(mod, _ctx):
        with target:
            passes = (
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + ([tuned] if tuned is not None else [])
                + [default_cpu_schedule()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
                + [canonical_shape_funcs]
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


# --- reproducible builds ----------------------------------------------------------------------
# Same model in, byte-identical libraries out. TVM 0.27 orders two things by object *address*
# (Python `hash()` of a TVM object and C++ `StructuralHash` of a free TIR var are pointer hashes),
# so the generated code changed with ASLR and with whatever the process had allocated before:
#
# 1. Legalization (`relax.utils.gen_call_tir_inputs`, behind every `call_te`) collects the
#    symbolic shape vars a kernel takes as extra parameters in a `set` and emits them in its
#    iteration order: one compile gives `f(x, s18, s19, out)`, the next `f(x, s19, s18, out)`.
#    The kernels differ, so do the BlockBuilder's deduplication, the kernel count and the names.
#    Fix: that module's `set` becomes an insertion-ordered set, so the parameters come in the
#    order the shapes use them (installed at import, so tuning sees the same kernels).
# 2. VMShapeLower emits one host `shape_func` per shape-computation point, its stores in the order
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


def build_library(mod: tvm.IRModule, target: DeployTarget, path: Path,
                  tuning_db: Path | None = None) -> tuple[list[str], dict]:
    """Compile every Relax function of `mod` into one shared library at `path`.

    Returns the function names and facts about the code: for CUDA, kernel count and the smallest
    thread block (so a one-thread fallback kernel cannot slip through unnoticed); with a tuning
    database, how many kernels took tuned schedules."""
    compiler = target.check_toolchain()
    tgt = tvm_target(target)
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
        tuned = None
        if tuning_db is not None:
            from .tuning import apply_database

            tuned = apply_database(tuning_db, tgt)  # one pass per library: its stats accumulate
        executable = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt, tuned))
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
