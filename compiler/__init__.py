"""moetvm compiler: PyTorch MoE model -> per-part TVM libraries + expert weight files."""

from .cuda_driver import ensure_loadable as _ensure_cuda_loadable

_ensure_cuda_loadable()  # before TVM is imported: see cuda_driver.py

from .api import compile_model, tune_model  # noqa: E402
from .spec import MoELayerSpec, UnsupportedModelError, find_moe_layers

__all__ = ["compile_model", "tune_model", "find_moe_layers", "MoELayerSpec", "UnsupportedModelError"]
