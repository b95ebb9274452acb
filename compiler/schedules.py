"""Default CPU schedules: every PrimFunc leaves the compiler scheduled, none runs TVM's naive loops.

Order of rules: dlight's CPU GEMV and Reduction rules where they match, then two small rules of
ours: `MatmulOuterProduct` for contractions whose innermost output axis is contiguous in the
right-hand operand (x @ W with W stored (in, out), which is how the compiler lays out every
weight), and `InjectiveVectorize` for elementwise/layout functions. They give vectorised inner
loops without needing float reassociation, and parallel outer loops.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.sym.analyzer import Analyzer
from tvm.tirx.compilation_pipeline import get_tir_pipeline, register_tir_pipeline
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial
from tvm.target import Target

VECTOR_LANES = 8  # fp32 lanes of a 256-bit vector; 2x NEON's 128 bits, which LLVM splits fine


def _is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


class InjectiveVectorize(ScheduleRule):
    """Elementwise/layout functions: the innermost loop kept whole (vectorised when its extent is a
    multiple of the vector), the outer loops fused into one parallel loop (`_parallel_rows`)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not infos or any(not i.is_injective() for i in infos):
            return None
        # Inline everything but the last block, then schedule the survivor.
        for info in infos[:-1]:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - not inlinable: leave the function to the next rule
                return None
        _parallel_rows(sch, infos[-1].block_rv)
        return sch


class MatmulOuterProduct(ScheduleRule):
    """C[..., i, j] = sum_k A[..., i, k] * B[..., k, j] (+ an injective epilogue).

    Loop order (..., i, jo, k, ji): ji walks 16 contiguous columns of B and C and is vectorised,
    so each k step is a broadcast-multiply-add into a register tile; (..., i, jo) is parallel.
    The reduction stays in order, so results match a sequential fp32 sum closely.
    """

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        reductions = [i for i in infos if i.is_reduction()]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        kinds = "".join(it.kind for it in main.iters)
        # Spatial iters first, exactly one reduction iter last, at least (i, j).
        if not (kinds.endswith("SR") and kinds.count("R") == 1 and kinds.startswith("S" * (len(kinds) - 1))):
            return None
        if not self._j_is_contiguous(sch, main):
            return None
        # Everything else must be injective and inline-able into or after the reduction.
        for info in infos:
            if info is main:
                continue
            if not info.is_injective():
                return None
        block = main.block_rv
        for info in infos[: infos.index(main)]:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001
                return None
        epilogues = infos[infos.index(main) + 1 :]
        loops = sch.get_loops(block)
        *spatial, j, k = loops
        jo, ji = sch.split(j, factors=[None, 2 * VECTOR_LANES])
        sch.reorder(*spatial, jo, k, ji)
        outer = sch.fuse(*spatial, jo) if spatial else jo
        sch.parallel(outer)
        # Accumulate the 16-lane tile in registers and store it once, not once per k. (Tiling
        # rows as well measured slower at batch 1 with a symbolic token count: tuning's job.)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, outer)
        sch.vectorize(ji)  # before decomposing: TVM checks vectorisation on the reduction block
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])
        for info in epilogues:
            _parallel_vectorize(sch, info.block_rv)
        return sch

    @staticmethod
    def _j_is_contiguous(sch, info) -> bool:
        """The innermost spatial iter must index the last dim of the output and of one read."""
        block = sch.get(info.block_rv)
        j_var = block.iter_vars[-2].var
        store = block.writes[0]
        if not store.region or not _is_var(store.region[-1].min, j_var):
            return False
        return any(r.region and _is_var(r.region[-1].min, j_var) for r in block.reads)


class OneRowReduction(ScheduleRule):
    """Reductions to one value (a static (1, 1, d) row: a decode step's RMSNorm) with injective
    blocks around them: the reductions left serial and whole, the injective blocks inlined where
    they can be and the output's row vectorised. dlight's CPU Reduction rule moves such a
    reduction under the output's loop and recomputes it per element: 829 us against 4 us for
    GraniteMoE's (1, 1, 1024) norm."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not infos[-1].is_injective():
            return None
        reductions = [i for i in infos if i.is_reduction()]
        if not reductions or any(not (i.is_reduction() or i.is_injective()) for i in infos):
            return None
        for info in reductions:
            extents = [it.dom for it in info.iters if it.kind == "S"]
            if not all(isinstance(e, (int, tirx.IntImm)) and int(e) == 1 for e in extents):
                return None
        try_inline_contiguous_spatial(sch, infos[:-1])  # what cannot be inlined stays its own loop
        _parallel_rows(sch, infos[-1].block_rv)
        return sch


def _parallel_vectorize(sch, block) -> None:
    """Fuse a spatial block's loops; parallel outer chunks, vectorised inner lanes."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = sch.split(fused, factors=[None, VECTOR_LANES * 8])
    sch.parallel(outer)
    _, vec = sch.split(inner, factors=[None, VECTOR_LANES])
    sch.vectorize(vec)


def _parallel_rows(sch, block) -> None:
    """Parallel over the fused outer loops, the innermost loop kept: its indices stay affine.

    Fusing every loop (`_parallel_vectorize`) makes each element recover its coordinates with
    `//` and `%` by the shape; with symbolic dims (past length) those are 64-bit divisions, per
    element, in scalarised "vector" lanes: ~35 ns an element, 1-4 ms per KV-sized copy at 512
    positions. Here the divisions happen once per row (hoisted by LLVM)."""
    *outer, inner = sch.get_loops(block) or [None]
    if inner is None:
        return
    extent = sch.get(inner).extent
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    # (an empty slice, e.g. Qwen3.5's interleaved rotary sections: a 0-lane vector does not build)
    if isinstance(extent, tirx.IntImm) and extent.value % VECTOR_LANES == 0 and extent.value > 0:
        if extent.value > VECTOR_LANES:
            _, inner = sch.split(inner, factors=[None, VECTOR_LANES])
        sch.vectorize(inner)
    elif not outer and not isinstance(extent, tirx.IntImm):
        chunk, _ = sch.split(inner, factors=[None, 256])  # one long symbolic row: parallel chunks
        sch.parallel(chunk)


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def default_cpu_schedule():
    """The pass applied after legalization for LLVM targets."""
    return dl.ApplyDefaultSchedule(
        dl.cpu.GEMV(),
        MatmulOuterProduct(),
        OneRowReduction(),
        dl.cpu.Reduction(),
        InjectiveVectorize(),
    )


# --- parallel loops only where the work pays for the launch -----------------------------------
# A parallel loop is a thread-pool launch: ~2.4 us with 2 threads on the Zen 5 machine (0.2 us of
# work serial), and the scheduled kernels mark almost every loop parallel. A GraniteMoE decode
# segment is ~15 launches (norms, RoPE, KV appends, residual adds of one token), which made it
# slower with 2 threads (102 us) than with 1 (60 us). Each parallel loop whose work is known is
# made serial below PARALLEL_MIN_WORK; where the work depends on shapes known only at run time
# (the sequence length: decode and prefill share kernels), the loop is guarded: parallel if
# extent x work >= PARALLEL_MIN_WORK, else the same loop serial.
PARALLEL_MIN_WORK = 4096  # stores (one per vector after vectorisation): ~4 us of serial work


def _loop_work(stmt, inner: list):
    """Stores `stmt` executes, as an expression over variables defined outside it (None when it
    depends on one defined inside, or on a statement this does not model); `inner` collects the
    variables it defines."""
    if isinstance(stmt, (tirx.BufferStore, tirx.Evaluate)):
        return tirx.IntImm("int64", 1)
    if isinstance(stmt, (tirx.Bind, tirx.LetStmt)):
        inner.append(stmt.var)
        return tirx.IntImm("int64", 0)
    if isinstance(stmt, (tirx.AllocBuffer, tirx.DeclBuffer)):
        return tirx.IntImm("int64", 0)
    if isinstance(stmt, tirx.AttrStmt):
        return _loop_work(stmt.body, inner)
    parts = []
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_loop_work(s, inner) for s in stmt.seq]
    elif isinstance(stmt, tirx.IfThenElse):
        parts = [_loop_work(s, inner) for s in (stmt.then_case, stmt.else_case) if s is not None]
    elif isinstance(stmt, tirx.For):
        if any(v.same_as(d) for v in tirx.analysis.undefined_vars(stmt.extent) for d in inner):
            return None
        inner.append(stmt.loop_var)
        body = _loop_work(stmt.body, inner)
        return None if body is None else tirx.Cast("int64", stmt.extent) * body
    else:
        return None
    if any(p is None for p in parts):
        return None
    total = tirx.IntImm("int64", 0)
    for p in parts:
        total = total + p
    return total


def _serial_when_small(stmt):
    """`stmt` with each parallel loop made serial or guarded as above."""
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_serial_when_small(s) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.IfThenElse):
        then, other = _serial_when_small(stmt.then_case), stmt.else_case and _serial_when_small(stmt.else_case)
        return tirx.IfThenElse(stmt.condition, then, other)
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _serial_when_small(stmt.body))
    if not isinstance(stmt, tirx.For):
        return stmt

    def loop(kind, body):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, kind, body, stmt.thread_binding, stmt.annotations)

    if stmt.kind != tirx.ForKind.PARALLEL:
        return loop(stmt.kind, _serial_when_small(stmt.body))
    work = _loop_work(stmt, [])
    if work is None:
        return stmt
    if not isinstance(work, tirx.IntImm) and _aliases_an_allocation(stmt):
        return stmt  # left parallel: a guarded copy of it would not compile (below)
    work = Analyzer().simplify(work)
    if isinstance(work, tirx.IntImm):
        return stmt if work.value >= PARALLEL_MIN_WORK else loop(tirx.ForKind.SERIAL, stmt.body)
    return tirx.IfThenElse(work >= PARALLEL_MIN_WORK, stmt, loop(tirx.ForKind.SERIAL, stmt.body))


def _aliases_an_allocation(stmt) -> bool:
    """Whether `stmt` declares a buffer over the data of one it allocates with a symbolic size
    (StorageRewrite's reuse of a scratch buffer for same-sized intermediates: Qwen3-Next's
    (1 + weight) RMSNorm over heads). In a guarded loop's second copy, ConvertSSA renames the
    allocation and its size but not the declarations' data (TVM 0.27: "cannot find variable" at
    codegen), so such loops are not duplicated. (Fixed-size reuse, every RMSNorm's, is fine.)"""
    allocated, aliased = [], []

    def visit(node):
        if isinstance(node, tirx.AllocBuffer) and not all(isinstance(d, tirx.IntImm) for d in node.buffer.shape):
            allocated.append(node.buffer.data)
        elif isinstance(node, tirx.DeclBuffer):
            aliased.append(node.buffer.data)
        for child in (*(getattr(node, "seq", None) or ()), *(getattr(node, f, None) for f in ("body", "then_case", "else_case"))):
            if isinstance(child, tirx.Stmt):
                visit(child)

    visit(stmt)
    names = {str(a) for a in allocated}  # as printed: the declarations carry data nodes of their own
    return any(str(data) in names for data in aliased)


@tirx.transform.prim_func_pass(opt_level=0, name="SerialWhenSmall")
def serial_when_small(func, _mod, _ctx):
    body = _serial_when_small(func.body)
    return func if body.same_as(func.body) else func.with_body(body)


def cpu_tir_pipeline():
    """TVM's TIR pipeline (s_tir) for CPU targets, with `serial_when_small` before the host
    code is finalized; the guarded loops' two copies get their own variables (ConvertSSA)."""
    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")

    def host():
        return tvm.transform.Sequential([serial_when_small, tirx.transform.ConvertSSA(), finalize_host()])

    return lower, host, finalize_device


CPU_TIR_PIPELINE = "moetvm_cpu"
register_tir_pipeline(CPU_TIR_PIPELINE, cpu_tir_pipeline)
