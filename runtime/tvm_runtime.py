"""TVM's runtime library, reached through tvm_ffi alone: what the runtime calls, without the
`tvm` Python package on a CPU.

`import tvm` imports ~100 Python modules (IR, targets, the compiler's APIs) even with
TVM_USE_RUNTIME_LIB=1, and the runtime uses none of them: they cost `moetvm run` on the shipped
model 38 MB of its 111 MB peak RSS and 0.3 s of its 1.2 s (x86). libtvm_runtime registers
tensors, modules and the Relax VM with tvm_ffi when it is loaded, and the functions below call
those registrations by name, as tvm.runtime's own wrappers (tvm/runtime/_tensor.py, vm.py) do.

If the `tvm` package is imported (the compiler in the same process), its library is the one in use
and the same calls reach it. A device other than the CPU imports `tvm`: its device runtime (CUDA)
is loaded and registered by TVM's backend loader.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
import tvm_ffi
from tvm_ffi.libinfo import load_lib_ctypes

Tensor = tvm_ffi.Tensor
Module = tvm_ffi.Module
Shape = tvm_ffi.Shape
load_module = tvm_ffi.load_module
# What a compiled function raises: TVM's own error kinds (InternalError, ...) arrive as
# RuntimeError without the tvm package, as its subclasses with it.
CALL_ERRORS = (ValueError, TypeError, RuntimeError)
_NAIVE_ALLOCATOR, _POOLED_ALLOCATOR = 1, 2  # tvm/runtime/vm.py's allocator kinds


def _load_library() -> None:
    """libtvm_runtime, from the installed apache-tvm, global (compiled libraries link against its
    symbols); found without running `tvm/__init__.py`."""
    if "tvm" in sys.modules:
        return  # the package loaded it
    spec = importlib.util.find_spec("tvm")
    folders = [Path(p) / "lib" for p in (spec.submodule_search_locations or [])] if spec else []
    load_lib_ctypes("apache-tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=folders)


_load_library()
_alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
_view = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")
_copy_from_bytes = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
_copy_to_bytes = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
_copy_between = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
_array_item = tvm_ffi.get_global_func("ffi.ArrayGetItem")
_CPU = tvm_ffi.device("cpu").dlpack_device_type()


def device(name: str) -> tvm_ffi.Device:
    """The artifact's device ("cpu", "cuda", ...); a non-CPU one brings in TVM's device runtime."""
    if name != "cpu":
        import tvm  # noqa: F401 - registers the device API (libtvm_runtime_cuda, ...)
    return tvm_ffi.device(name)


def is_cpu(dev: tvm_ffi.Device) -> bool:
    return dev.dlpack_device_type() == _CPU


def from_dlpack(array) -> Tensor:
    """A tensor over `array`'s memory (no copy), which must be contiguous and 64-byte aligned, as
    compiled code assumes."""
    return tvm_ffi.from_dlpack(array, require_alignment=64, require_contiguous=True)


def wrap(array: np.ndarray) -> Tensor:
    """from_dlpack for any weight dtype: DLPack has no bfloat16, so such an array crosses as its
    16-bit patterns and is viewed as bfloat16 on the TVM side."""
    if array.dtype.name != "bfloat16":
        return from_dlpack(array)
    return view(from_dlpack(array.view(np.uint16)), array.shape, "bfloat16")


def empty(shape, dtype, dev: tvm_ffi.Device) -> Tensor:
    return _alloc(Shape([int(n) for n in shape]), tvm_ffi.dtype(str(dtype)), dev, None)


def tensor(array: np.ndarray, dev: tvm_ffi.Device) -> Tensor:
    """A copy of `array` on `dev`."""
    array = np.asarray(array)
    return copy_into(empty(array.shape, array.dtype, dev), array)


def view(x: Tensor, shape, dtype: str | None = None, byte_offset: int = 0) -> Tensor:
    """`x`'s memory as another shape (and dtype), from `byte_offset` on: no copy. A Shape is used
    as it is (the resident layer's plan builds its shapes once, for the per-token views)."""
    if not isinstance(shape, Shape):
        shape = Shape([int(n) for n in shape])
    return _view(x, shape, str(dtype or x.dtype), byte_offset)


def results(values, n: int) -> list:
    """A compiled function's n results as a list: a Tensor alone, or an Array's first n items.
    Iterating a tvm_ffi Array calls the FFI twice an item and runs its Python bounds checks: 2.4 us
    for two results against 0.45 item by item (hot; a decode token unpacks 25 segments' results)."""
    if isinstance(values, Tensor):
        return [values]
    return [_array_item(values, i) for i in range(n)]


def copy_into(x: Tensor, source: np.ndarray | Tensor) -> Tensor:
    """Copy `source`, an array or a tensor (on any device) of `x`'s shape and dtype, into `x`."""
    if tuple(source.shape) != tuple(x.shape) or str(source.dtype) != str(x.dtype):
        raise ValueError(f"cannot copy {source.dtype}{list(source.shape)} into a {x.dtype}{list(x.shape)} tensor")
    if isinstance(source, Tensor):
        _copy_between(source, x)
    else:
        source = np.ascontiguousarray(source)
        _copy_from_bytes(x, source.ctypes.data_as(ctypes.c_void_p), source.nbytes)
    return x


def numpy_dtype(dtype: str) -> np.dtype:
    """NumPy's dtype for a TVM dtype name. bfloat16, which NumPy lacks, is ml_dtypes' (a dependency
    of TVM's), imported here and only for it: its import is 0.8 s (runtime/__init__.py)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def to_numpy(x: Tensor) -> np.ndarray:
    """A NumPy copy of `x` (from any device)."""
    out = np.empty(tuple(x.shape), dtype=numpy_dtype(str(x.dtype)))
    _copy_to_bytes(x, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


class VirtualMachine:
    """A Relax VM over a loaded library: its functions by name (tvm.runtime.vm.VirtualMachine's
    set-up, without the rest of that class). `naive`: allocate and free each intermediate (TVM's
    default pools a buffer of every size it has seen)."""

    def __init__(self, library: Module, dev: tvm_ffi.Device, naive: bool = False):
        self.module = library["vm_load_executable"]()
        alloc = _NAIVE_ALLOCATOR if naive else _POOLED_ALLOCATOR
        devices = [dev] if is_cpu(dev) else [dev, tvm_ffi.device("cpu")]  # shape functions run on the CPU
        self.module["vm_initialization"](*[v for d in devices for v in (d.dlpack_device_type(), d.index, alloc)])

    def __getitem__(self, function: str) -> tvm_ffi.Function:
        return self.module[function]
