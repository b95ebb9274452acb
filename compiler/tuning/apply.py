"""Using the database at compile time: a pass that gives every kernel with a record its tuned
schedule and leaves the rest to the default ones."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from .common import DEFAULT_BUCKETS, TuningError
from .targets import as_tvm_target, target_key
from .tasks import _is_buffer, _is_scheduled, _normalize_buckets, _values_label, bucket_values, normalize, specialize, symbolic_vars, workload_key
from .database import _index, _read_sidecar, open_database
from .search import tune


@dataclass
class TuningStats:
    """What `apply_database` did to the kernels of the modules it ran on."""

    tuned: dict[str, str] = field(default_factory=dict)  # kernel -> "exact" | "buckets n=1; n=32"
    default: list[str] = field(default_factory=list)  # kernels left entirely to the default schedules
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why its records went unused

    def summary(self) -> str:
        return f"{len(self.tuned)} kernels tuned, {len(self.default)} default"

    def as_dict(self) -> dict:
        return {"tuned": len(self.tuned), "default": len(self.default), "kernels": dict(self.tuned),
                **({"rejected": dict(self.rejected)} if self.rejected else {})}


def _root(func: tirx.PrimFunc) -> s_tir.SBlock:
    body = func.body
    if not (isinstance(body, s_tir.SBlockRealize) and body.block.name_hint == "root"):
        raise TuningError("kernel body is not a root block")
    return body.block


def _apply_record(rec, func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` scheduled by a record's trace (postprocessing included, as MetaSchedule's own
    Database.query_schedule does). Params stay the same objects."""
    sch = s_tir.Schedule(normalize(func))
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod["main"]


def _bucket_block(values: Mapping[str, int], scheduled: tirx.PrimFunc, symbolic: tirx.PrimFunc,
                  syms) -> s_tir.SBlockRealize:
    """The static kernel `scheduled` (a bucket specialisation of `symbolic`, scheduled) as a block
    inside `symbolic`: each buffer whose shape was bound is matched onto the leading region of
    the symbolic buffer (`T.match_buffer(x[0:32, 0:64], (32, 64))`), so the tuned code runs
    unchanged on the caller's tensors."""
    static_params = list(scheduled.params)
    matches = []
    for p in symbolic.params:
        if not _is_buffer(p):
            if any(p.same_as(v) for v in syms):
                continue  # a scalar shape parameter: specialisation removed it
        sp = static_params.pop(0)
        if sp.same_as(p):
            continue
        if not _is_buffer(sp) or len(sp.shape) != len(p.shape):
            raise TuningError("bucket kernel parameters do not line up with the symbolic kernel's")
        region = [tvm.ir.Range.from_min_extent(tirx.IntImm(str(e.ty.dtype) if hasattr(e, "ty") else "int64", 0), e)
                  for e in sp.shape]
        matches.append(s_tir.MatchBufferRegion(sp, tirx.BufferRegion(p, region)))
    if static_params:
        raise TuningError("bucket kernel has parameters the symbolic kernel lacks")
    root = _root(scheduled)
    block = s_tir.SBlock([], [], [], f"tuned_{_values_label(values)}", root.body, alloc_buffers=list(root.alloc_buffers),
                         match_buffers=matches)
    return s_tir.SBlockRealize([], True, block)


def _dispatch(symbolic: tirx.PrimFunc, fallback: tirx.PrimFunc, buckets: list[tuple[dict, tirx.PrimFunc]],
              syms) -> tirx.PrimFunc:
    """`if n == b1: <tuned for b1> elif n == b2: ... else: <fallback>` as one kernel (for several
    symbolic dims, a branch is taken when all equal their bucket values)."""
    base = _root(fallback)
    if len(fallback.params) != len(symbolic.params) or not all(a.same_as(b) for a, b in zip(fallback.params,
                                                                                              symbolic.params)):
        raise TuningError("default schedule changed the kernel's parameters")
    stmt = base.body
    for values, scheduled in reversed(buckets):
        cond = None
        for v in syms:
            c = tirx.EQ(v, tirx.IntImm(str(v.ty.dtype), values[v.name]))
            cond = c if cond is None else tirx.And(cond, c)
        stmt = tirx.IfThenElse(cond, _bucket_block(values, scheduled, symbolic, syms), stmt)
    root = s_tir.SBlock([], [], [], "root", stmt, alloc_buffers=list(base.alloc_buffers))
    return symbolic.with_body(s_tir.SBlockRealize([], True, root))


def _finish(new: tirx.PrimFunc, old: tirx.PrimFunc) -> tirx.PrimFunc:
    """The original function's attributes (and its lack of a global symbol), marked scheduled."""
    if old.attrs:
        new = new.with_attrs({**dict(new.attrs.items()), **dict(old.attrs.items())})
    if not (old.attrs and "global_symbol" in old.attrs) and new.attrs and "global_symbol" in new.attrs:
        new = new.without_attr("global_symbol")
    return new.with_attr("tirx.is_scheduled", True)


def _build_problem(func: tirx.PrimFunc, target: tvm.target.Target) -> str | None:
    try:
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        return None
    except Exception as e:  # noqa: BLE001 - reported; the kernel then keeps the default schedule
        lines = str(e).strip().splitlines()
        return f"does not build: {type(e).__name__}: {lines[-1] if lines else ''}"


@tvm.transform.module_pass(opt_level=0, name="MoetvmApplyTuningDatabase")
class ApplyTuningDatabase:
    """See `apply_database`."""

    def __init__(self, work_dir, target=None, buckets=None, verify: bool = True,
                 fallback: tvm.transform.Pass | None = None):
        self.work_dir = Path(work_dir)
        self.target = None if target is None else as_tvm_target(target)
        sidecar = _read_sidecar(self.work_dir)
        chosen = buckets if buckets is not None else (sidecar.get("buckets") or DEFAULT_BUCKETS)
        self.buckets = _normalize_buckets(chosen)
        self.verify = verify
        self.fallback = fallback
        self.stats = TuningStats()
        # A directory that is not a tuning database is a mistake (a typo, an artifact directory):
        # TuningError here rather than a compile that quietly uses no tuned kernel.
        self._index = _index(open_database(self.work_dir, create=False))

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if target is None:
            raise TuningError("apply_database needs a target: pass one, or run the pass under `with target:`")
        tkey = target_key(target)
        updates = {}
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            try:
                new = self._schedule(gv.name_hint, func, target, tkey)
            except Exception as e:  # noqa: BLE001 - one odd kernel must not fail the compile
                self.stats.rejected[gv.name_hint] = f"{type(e).__name__}: {e}"
                new = None
            if new is None:
                self.stats.default.append(gv.name_hint)
            else:
                updates[gv] = _finish(new, func)
        if updates:
            mod = mod.clone()
            for gv, func in updates.items():
                mod.update_func(gv, func)
        return mod

    def _best(self, func: tirx.PrimFunc, tkey: str):
        wl = normalize(func)
        entry = self._index.get((workload_key(wl), tkey))
        if entry is None or entry.best is None or not tvm_ffi.structural_equal(entry.best.workload.mod, wl):
            return None
        return entry.best

    def _default_schedule(self, func: tirx.PrimFunc, target) -> tirx.PrimFunc:
        from ..schedules import default_cpu_schedule

        fallback = self.fallback or default_cpu_schedule()
        with target:
            return fallback(tvm.IRModule({"main": func}))["main"]

    def _schedule(self, name: str, func: tirx.PrimFunc, target, tkey: str) -> tirx.PrimFunc | None:
        syms = symbolic_vars(func)
        if not syms:
            rec = self._best(func, tkey)
            if rec is None:
                return None
            self.stats.tuned[name] = "exact"
            return _apply_record(rec, func)
        symbolic = normalize(func)["main"]
        syms = symbolic_vars(symbolic)
        buckets: list[tuple[dict, tirx.PrimFunc]] = []
        for bucket in self.buckets:
            values = bucket_values(symbolic, bucket)
            if values is None or any(values == v for v, _ in buckets):
                continue
            static = specialize(symbolic, bucket)
            rec = None if static is None else self._best(static, tkey)
            if rec is not None:
                buckets.append((values, _apply_record(rec, static)))
        if not buckets:
            return None
        new = _dispatch(symbolic, self._default_schedule(symbolic, target), buckets, syms)
        if self.verify:
            problem = _build_problem(new, target)
            if problem:
                self.stats.rejected[name] = problem
                return None
        self.stats.tuned[name] = "buckets " + "; ".join(_values_label(v) for v, _ in buckets)
        return new


def apply_database(work_dir: str | os.PathLike, target=None, *, buckets=None,
                   verify: bool = True, fallback: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """A module pass for the compile pipeline, to run right after legalisation and fusion and
    before the default schedules: every PrimFunc with a record in the database at `work_dir` (for
    this target) gets its tuned schedule and is marked `tirx.is_scheduled`, so the default
    schedules skip it; the others are left alone (the default schedules take them). TuningError
    (here, before anything is compiled) when `work_dir` does not exist or is not a tuning database;
    `open_database(work_dir, create=False)` makes the same check on its own.

    Static kernels take their best record as is. A symbolic kernel becomes one kernel that
    branches on its token count: `n == bucket` runs that bucket's tuned code (the static
    schedule, on the leading rows of the caller's buffers), any other n the default schedule
    (`fallback`, by default compiler/schedules.py's). `buckets` defaults to those recorded by
    `tune` in the database directory. `verify` compiles each dispatching kernel once, so one that
    cannot build falls back to the default instead of failing the compile. `target` defaults to
    the pipeline's current target.

    After the pipeline ran, `pass_.stats` (a TuningStats) tells what happened:
    `pass_.stats.summary()` -> "N kernels tuned, M default"."""
    return ApplyTuningDatabase(work_dir, target, buckets, verify, fallback)
