"""Relax -> kernel libraries for a deploy target."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import tvm
from tvm import relax
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
        return relax.get_default_pipeline(target)
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
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


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
