"""Relax -> kernel libraries for a deploy target."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.support import cc

from moetvm.targets import DeployTarget

from .schedules import default_cpu_schedule


def tvm_target(target: DeployTarget) -> tvm.target.Target:
    if target.host:
        return tvm.target.Target(target.tvm_target, target.host)
    return tvm.target.Target(target.tvm_target)


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's own pipeline, with our default CPU schedules inserted after legalization (the
    CUDA pipeline already applies dlight's GPU schedules)."""
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="MoetvmCPUPipeline")
    def pipeline(mod, _ctx):
        with target:
            passes = (
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [default_cpu_schedule()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build_library(mod: tvm.IRModule, target: DeployTarget, path: Path) -> list[str]:
    """Compile every Relax function of `mod` into one shared library at `path`."""
    compiler = target.check_toolchain()
    tgt = tvm_target(target)
    mod = relax.transform.ConvertToDataflow()(mod)
    executable = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt))
    if compiler:
        executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    else:
        executable.export_library(str(path))
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
