"""moetvm runtime: runs a compiled artifact with no torch, onnx or xgboost (ships to boards)."""

import os as _os
import sys as _sys


def _import_tvm_runtime() -> None:
    """Import TVM's runtime with `import torch` and `import ml_dtypes` made to fail, so the
    runtime's process stays free of torch (about 200 MB of RSS on a workstation) even where torch
    is installed, and of ml_dtypes unless an artifact holds bfloat16 (0.8 s of start-up and 7.4 MB).

    apache-tvm-ffi 0.1.14 imports torch, when it can, from five places while it is imported, and no
    setting turns all of them off: tvm_ffi/__init__.py ("try importing torch first", no switch),
    tvm_ffi/_convert.py and stream.py (module level, no switch), the Cython core's function.pxi and
    dtype.pxi (only TVM_FFI_BUILD_DOCS=1, which also drops numpy support), and
    _optional_torch_c_dlpack.py (TVM_FFI_DISABLE_TORCH_C_DLPACK=1). Each is wrapped in
    `except ImportError`, so a `None` in sys.modules for the length of the import turns them all
    into "torch is not installed". The entry is removed afterwards: torch stays importable, the
    compiler imports it as usual (TVM's torch frontend imports torch itself; torch tensors then
    reach tvm_ffi through DLPack instead of tvm_ffi's torch fast path).
    ml_dtypes the same way (dtype.pxi, _dtype.py): tvm_ffi then names NumPy's bfloat16 by its
    string, as it does with it, and the runtime never hands tvm_ffi a bfloat16 array (DLPack has
    none: tvm_runtime.wrap); the runtime imports ml_dtypes itself where it meets bfloat16.

    Nothing is done if tvm_ffi or torch is already imported (the compiler came first), or if
    MOETVM_RUNTIME_ALLOW_TORCH=1. (The CLI's runtime commands block torch for the whole process.)
    """
    if "tvm_ffi" in _sys.modules or _sys.modules.get("torch") is not None:
        return
    if _os.environ.get("MOETVM_RUNTIME_ALLOW_TORCH", "0") == "1":
        return
    blocked = [name for name in ("torch", "ml_dtypes") if name not in _sys.modules]
    for name in blocked:
        _sys.modules[name] = None  # `import torch` (and torch.*), `import ml_dtypes` now raise ImportError
    try:
        from . import tvm_runtime  # noqa: F401 - tvm_ffi and TVM's runtime library, not the tvm package
    finally:
        for name in blocked:
            if name in _sys.modules and _sys.modules[name] is None:
                del _sys.modules[name]


_import_tvm_runtime()

from moetvm.artifact import ArtifactError  # noqa: E402

from .cache import ExpertCache, parse_budget  # noqa: E402
from .generation import Generation, GenerationError, Sampling, Token  # noqa: E402
from .model import InputError, MoEModel, load_model  # noqa: E402
from .tokenizer import Tokenizer, TokenizerError  # noqa: E402

__all__ = ["ArtifactError", "ExpertCache", "Generation", "GenerationError", "InputError", "MoEModel", "Sampling", "Token",
           "Tokenizer", "TokenizerError", "load_model", "parse_budget"]
