"""Task extraction: lower each Relax module exactly as the compile does
(lowering.lower_until_scheduling), collect its kernels, specialise symbolic token counts to
buckets, and deduplicate them by structural hash."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import tvm
import tvm_ffi
from tvm import relax, tirx

from .common import DEFAULT_BUCKETS
from .targets import as_tvm_target


# --- lowering and symbolic shapes ------------------------------------------------------------
def lower_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as the CPU pipeline sees it right before scheduling: the kernels tuned are the
    kernels compiled (one pass list, compiler/lowering.py's until_scheduling)."""
    from ..lowering import lower_until_scheduling

    return lower_until_scheduling(mod, target)


def _is_buffer(param) -> bool:
    return isinstance(param.ty, tirx.buffer.BufferType)


def symbolic_vars(func: tirx.PrimFunc) -> list[tirx.Var]:
    """The symbolic dims of a kernel: vars in its buffers' shapes and scalar shape parameters."""
    found: list[tirx.Var] = []

    def add(v):
        if not any(v.same_as(o) for o in found):
            found.append(v)

    for p in func.params:
        if _is_buffer(p):
            for d in p.shape:
                for v in tirx.analysis.undefined_vars(d, []) if not isinstance(d, tirx.IntImm) else []:
                    add(v)
        elif "int" in str(p.ty):
            add(p)
    return found


def bucket_values(func: tirx.PrimFunc, bucket) -> dict[str, int] | None:
    """Symbolic dim name -> value for `bucket`: an int binds every symbolic dim of the kernel to
    it; a mapping binds dims by name ("*" for the rest). None where a dim has no value."""
    values = {}
    for v in symbolic_vars(func):
        if isinstance(bucket, Mapping):
            value = bucket.get(v.name, bucket.get("*"))
            if value is None:
                return None
        else:
            value = bucket
        values[v.name] = int(value)
    return values


def bucket_label(bucket) -> str:
    """"n32" for an int bucket, "s10=1,s18=32" for a mapping."""
    if isinstance(bucket, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(bucket.items()))
    return f"n{int(bucket)}"


def _values_label(values: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _bucket_sort_key(bucket):
    return (1, json.dumps(dict(bucket), sort_keys=True)) if isinstance(bucket, Mapping) else (0, int(bucket))


def _normalize_buckets(buckets) -> list:
    out = []
    for b in buckets:
        b = {str(k): int(v) for k, v in b.items()} if isinstance(b, Mapping) else int(b)
        if b not in out:
            out.append(b)
    return sorted(out, key=_bucket_sort_key)


def specialize(func: tirx.PrimFunc, bucket) -> tirx.PrimFunc | None:
    """`func` with its symbolic dims bound to `bucket` (see `bucket_values`): for an int, the
    kernel Relax's BindSymbolicVars + legalisation produce for the bound module (structurally
    equal). None where the bucket gives no value for a dim or the signature cannot be bound."""
    syms = symbolic_vars(func)
    if not syms:
        return func
    values = bucket_values(func, bucket)
    if values is None:
        return None
    mapping = {}
    for p in func.params:
        if _is_buffer(p):
            dims = list(p.shape)
            if not any(isinstance(d, tirx.Var) for d in dims):
                continue  # static, or only compound dims (n + past): substituted through the vars
            # Pure-var dims take their values; compound dims stay as they are (matched equal),
            # and are substituted once their vars are bound.
            shape = [tirx.IntImm(str(d.ty.dtype), values[d.name]) if isinstance(d, tirx.Var) else d for d in dims]
            mapping[p] = tirx.decl_buffer(shape, p.dtype, p.name, data_alignment=p.data_alignment,
                                          offset_factor=p.offset_factor, elem_offset=p.elem_offset)
        elif any(p.same_as(v) for v in syms):
            mapping[p] = tirx.IntImm(str(p.ty.dtype), values[p.name])
    try:
        out = func.specialize(mapping)
    except Exception:  # noqa: BLE001 - an exotic signature: leave the kernel to the defaults
        return None
    return None if symbolic_vars(out) else out


def normalize(func: tirx.PrimFunc) -> tvm.IRModule:
    """The workload form MetaSchedule tunes and its database keys on (TuneContext's normalisation)."""
    if not (func.attrs and "global_symbol" in func.attrs):
        func = func.with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func.with_attr("tirx.noalias", True)})


def workload_key(mod: tvm.IRModule) -> str:
    """The structural hash MetaSchedule's database stores for a workload (as a decimal string)."""
    return str(tvm_ffi.structural_hash(mod))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]))


# --- task extraction -------------------------------------------------------------------------
@dataclass
class Task:
    """One distinct kernel to tune (at one token-count bucket, for symbolic kernels)."""

    name: str  # "<library>.<kernel>", plus "@<bucket>" ("@n32", "@s10=1,s18=32") for a symbolic kernel
    mod: tvm.IRModule  # the static workload ("main" PrimFunc) MetaSchedule tunes
    key: str  # workload_key(mod): MetaSchedule's structural hash
    weight: int  # call sites using it, over every function of every library
    libraries: list[str]  # the libraries it came from
    kernel: str  # PrimFunc name in the lowered module (first seen)
    bucket: int | dict | None = None  # the bucket its symbolic dims were bound to; None: a static kernel
    symbolic: list[str] = field(default_factory=list)  # names of those dims
    values: dict[str, int] = field(default_factory=dict)  # the value each got

    def __repr__(self) -> str:
        return f"Task({self.name!r}, key={self.key}, weight={self.weight}, libraries={self.libraries})"


def _call_sites(mod: tvm.IRModule) -> dict[str, int]:
    """PrimFunc name -> number of call_tir sites in the module's Relax functions."""
    counts: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            gv = expr.args[0]
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def extract_tasks(
    mods: Mapping[str, tvm.IRModule],
    target,
    buckets: Iterable[int | Mapping[str, int]] = DEFAULT_BUCKETS,
) -> list[Task]:
    """Distinct kernels of `mods` (library name -> Relax module), deduplicated by structural hash.

    Static kernels give one task each; symbolic ones one task per bucket (`specialize`). Weight =
    call sites over all functions and libraries, so E experts of one shape give one task of weight E
    per kernel when compiled together (compile_model builds one expert function per workload, so
    there the weight is the number of workloads sharing the kernel).

    A bucket is an int, binding every symbolic dim of a kernel (a kernel with batch, seq and past
    dims at bucket 32 is tuned for batch=seq=past=32, and its tuned code runs only when all three
    are 32), or a mapping from dim name to value ("*" for unnamed dims; kernels with a dim it
    does not cover are not tuned at that bucket). Call once per library for different buckets."""
    target = as_tvm_target(target)
    buckets = _normalize_buckets(buckets)
    tasks: dict[str, Task] = {}
    for library, mod in mods.items():
        lowered = lower_for_tuning(mod, target)
        sites = _call_sites(lowered)
        for gv, func in lowered.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func) or gv.name_hint not in sites:
                continue
            syms = symbolic_vars(func)
            variants = [(None, func)] if not syms else [(b, specialize(func, b)) for b in buckets]
            for bucket, static in variants:
                if static is None:
                    continue
                wl = normalize(static)
                key = workload_key(wl)
                task = tasks.get(key)
                if task is None:
                    name = f"{library}.{gv.name_hint}" + ("" if bucket is None else f"@{bucket_label(bucket)}")
                    tasks[key] = Task(name=name, mod=wl, key=key, weight=sites[gv.name_hint], libraries=[library],
                                      kernel=gv.name_hint, bucket=bucket, symbolic=[v.name for v in syms],
                                      values=bucket_values(func, bucket) if bucket is not None else {})
                else:
                    task.weight += sites[gv.name_hint]
                    if library not in task.libraries:
                        task.libraries.append(library)
    return list(tasks.values())
