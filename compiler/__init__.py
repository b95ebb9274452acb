"""moetvm compiler: PyTorch MoE model -> per-part TVM libraries + expert weight files."""

from .api import compile_model
from .spec import MoELayerSpec, UnsupportedModelError, find_moe_layers

__all__ = ["compile_model", "find_moe_layers", "MoELayerSpec", "UnsupportedModelError"]
