"""moetvm compiler: PyTorch MoE model -> per-part TVM libraries + expert weight files."""

from .cuda_driver import ensure_loadable as _ensure_cuda_loadable

_ensure_cuda_loadable()  # before TVM is imported: see cuda_driver.py

from .api import compile_model, compile_onnx, compile_targets, tune_model  # noqa: E402
from .build_target import BuildTarget  # noqa: E402
from .options import CompileOptions  # noqa: E402
from .adapters import find_moe_layers  # noqa: E402
from .spec import MoELayerSpec, UnsupportedModelError  # noqa: E402

__all__ = ["compile_model", "compile_targets", "compile_onnx", "tune_model", "CompileOptions", "BuildTarget", "find_moe_layers", "MoELayerSpec", "UnsupportedModelError"]
