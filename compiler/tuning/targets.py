"""Targets as tuning sees them (TVM targets, their keys in the database), and whether tuning
can run here at all."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import subprocess
import sys
from dataclasses import field

import tvm
import tvm_ffi
from tvm import tirx

from .common import TuningError


# --- targets ---------------------------------------------------------------------------------
def as_tvm_target(target) -> tvm.target.Target:
    """A tvm Target from a Target, a JSON dict, or a BuildTarget (its `tvm`)."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if isinstance(getattr(target, "tvm", None), tvm.target.Target):
        return target.tvm
    raise TypeError(f"expected a tvm Target, a target dict or a BuildTarget, got {type(target).__name__}")


def check_target(target: tvm.target.Target) -> None:
    """MetaSchedule needs `num-cores` on CPU targets (parallel extents, tuning threads)."""
    if target.kind.name == "llvm" and int(target.attrs.get("num-cores", 0) or 0) <= 0:
        raise TuningError(
            f"target {target} has no 'num-cores': MetaSchedule needs it to size parallel loops; "
            "add it to the target's JSON dict (e.g. \"num-cores\": 4)"
        )


def target_key(target: tvm.target.Target) -> str:
    """What must agree between a tuning record and a compile: the target minus its host."""
    d = dict(target.export())
    d.pop("host", None)
    d.pop("tag", None)

    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, tirx.IntImm):
            return int(v)
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        try:
            return [plain(x) for x in v]
        except TypeError:
            return str(v)

    return json.dumps({k: plain(v) for k, v in d.items()}, sort_keys=True)


# --- environment checks ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _serialization_problem() -> str | None:
    """MetaSchedule's JSON database serialises IR with tvm-ffi's JSON graph writer. With
    apache-tvm 0.27.0.post1 and apache-tvm-ffi 0.1.15.x that writer crashes the process (SIGSEGV)
    on any IR node with a dtype field; 0.1.14.x works. Probe in a child process, once."""
    probe = "import tvm; tvm.ir.save_json(tvm.ir.PrimType('int32'))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return None
    return (
        f"tvm.ir.save_json crashes in this environment (exit {r.returncode}; apache-tvm {tvm.__version__}, "
        f"apache-tvm-ffi {getattr(tvm_ffi, '__version__', '?')}), so MetaSchedule's JSON database cannot be "
        "written. apache-tvm 0.27.0.post1 needs apache-tvm-ffi 0.1.14.x: pip install 'apache-tvm-ffi>=0.1.14,<0.1.15'"
    )


def require_working_serialization() -> None:
    problem = _serialization_problem()
    if problem:
        raise TuningError(problem)


def load_tensor_intrinsics(target: tvm.target.Target) -> None:
    """MetaSchedule's CPU rules name x86/Arm tensor intrinsics (VNNI, dot-product), which must be
    registered first. `import tvm.s_tir.tensor_intrin` registers every backend's, CUDA's alone
    taking 10-35 s; for CPU targets load only the x86 and Arm ones (about 1.5 s). TuneContext then
    finds the package imported and does not import the rest; any submodule still imports on use."""
    name = "tvm.s_tir.tensor_intrin"
    if target.kind.name != "llvm":  # everything, as the package itself would (also after a CPU run)
        importlib.import_module(name)
        for sub in ("cuda", "arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu"):
            importlib.import_module(f"{name}.{sub}")
        return
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)  # the package, without running its __init__
    sys.modules[name] = package
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")
