"""Parallel loops only where the work pays for a thread-pool launch (compiler/schedules.py,
serial_when_small): one token's norms, adds and KV appends run serial, big kernels and long
sequences stay parallel, and both copies of a guarded loop compute the same thing."""

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from moetvm.compiler.build_target import BuildTarget
from moetvm.compiler.schedules import CPU_TIR_PIPELINE, PARALLEL_MIN_WORK, serial_when_small


def static_add(rows: int):
    """b = a + 1 over (rows, 1024), parallel over rows: 1024 stores a row."""

    @T.prim_func
    def add(a: T.Buffer((rows, 1024), "float32"), b: T.Buffer((rows, 1024), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(rows):
            for j in T.serial(1024):
                b[i, j] = a[i, j] + T.float32(1)

    return add


@T.prim_func
def rows_add(a_h: T.handle, b_h: T.handle):
    T.func_attr({"tirx.noalias": True})
    n = T.int64()
    a = T.match_buffer(a_h, (n, 1024), "float32")
    b = T.match_buffer(b_h, (n, 1024), "float32")
    for i in T.parallel(n):
        for j in T.serial(1024):
            b[i, j] = a[i, j] * T.float32(2)


@T.prim_func
def data_dependent(a: T.Buffer((8, 64), "int32"), b: T.Buffer((8, 64), "int32")):
    T.func_attr({"tirx.noalias": True})
    for i in T.parallel(8):
        if True:
            stop: T.let[T.int32] = a[i, 0] % 64
            for j in T.serial(stop):
                b[i, j] = a[i, j]


def _kinds(func) -> list:
    """(kind, under a condition) of every loop, in order."""
    out = []

    def walk(stmt, guarded):
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                walk(s, guarded)
        elif isinstance(stmt, tirx.IfThenElse):
            walk(stmt.then_case, True)
            if stmt.else_case is not None:
                walk(stmt.else_case, True)
        elif isinstance(stmt, tirx.For):
            out.append((stmt.kind, guarded))
            walk(stmt.body, guarded)
        elif hasattr(stmt, "body"):
            walk(stmt.body, guarded)

    walk(func.body, False)
    return out


def _transformed(func):
    return serial_when_small(tvm.IRModule({"main": func}))["main"]


def test_small_static_work_runs_serial_and_big_work_parallel():
    assert 1024 < PARALLEL_MIN_WORK <= 64 * 1024
    assert _kinds(_transformed(static_add(1))) == [(tirx.ForKind.SERIAL, False)] * 2  # one token
    assert _kinds(_transformed(static_add(64)))[0] == (tirx.ForKind.PARALLEL, False)


def test_work_known_only_at_run_time_is_guarded_and_both_copies_agree():
    kinds = _kinds(_transformed(rows_add))
    assert (tirx.ForKind.PARALLEL, True) in kinds and (tirx.ForKind.SERIAL, True) in kinds
    lib = tvm.compile(tvm.IRModule({"main": rows_add}), target=BuildTarget.resolve("host").tvm, tir_pipeline=CPU_TIR_PIPELINE)
    for rows in (1, 3, 64):  # serial below 4 rows of 1024, parallel above
        a = np.random.default_rng(rows).standard_normal((rows, 1024)).astype(np.float32)
        b = tvm.runtime.empty((rows, 1024), "float32")
        lib["main"](tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), a * 2)


def test_work_that_depends_on_data_stays_parallel():
    assert _kinds(_transformed(data_dependent))[0] == (tirx.ForKind.PARALLEL, False)
