"""moetvm runtime: runs a compiled artifact with no torch, onnx or xgboost (ships to boards)."""

from moetvm.artifact import ArtifactError

from .cache import ExpertCache, parse_budget
from .model import InputError, MoEModel, load_model

__all__ = ["ArtifactError", "ExpertCache", "InputError", "MoEModel", "load_model", "parse_budget"]
