"""Deployment targets (boards) known to moetvm."""

from .registry import BUILTIN, DeployTarget, TargetError, get_target, known_targets

__all__ = ["BUILTIN", "DeployTarget", "TargetError", "get_target", "known_targets"]
