"""Let TVM build real CUDA device code on a workstation without an NVIDIA driver.

TVM's CUDA runtime library links against the driver (`libcuda.so.1`). Where that cannot be
loaded, TVM silently falls back to shipping CUDA *source* instead of a cubin/fatbin. Building
for a Jetson on a GPU-less workstation is the normal case here, so before TVM is imported we
load, if no driver is present, a stand-in `libcuda.so.1` whose functions all report "no device"
(what NVIDIA's toolkit `stubs/` libraries are for; this toolkit install lacks them). Nothing
runs kernels in the compiler; nvcc produces the device code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# The driver entry points libtvm_runtime_cuda.so imports (nm -D --undefined-only).
_DRIVER_SYMBOLS = [
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
]


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _build_stub() -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source = "\n".join(f"int {name}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}" for name in _DRIVER_SYMBOLS)
    tag = hashlib.sha256(source.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moetvm" / f"cuda-stub-{tag}"
    lib = cache / "libcuda.so.1"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "stub.c").write_text(source + "\n")
        tmp = cache / f"libcuda.so.1.{os.getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(cache / "stub.c")],
                       check=True, capture_output=True)
        os.replace(tmp, lib)
    return lib


def ensure_loadable() -> str:
    """'driver', 'stub', or 'unavailable'. Must run before `import tvm` to take effect."""
    if "tvm" in sys.modules:
        return "driver" if cuda_runtime_loaded() else "unavailable"
    if _driver_present():
        return "driver"
    try:
        lib = _build_stub()
    except (OSError, subprocess.CalledProcessError):
        lib = None
    if lib is None:
        return "unavailable"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return "stub"


def cuda_runtime_loaded() -> bool:
    from tvm.base import _LOADED_LIBS

    return "tvm_runtime_cuda" in _LOADED_LIBS
