"""Adapters: read a model's MoE blocks into MoELayerSpecs, structurally (nothing is traced).

An adapter takes (module, path) and returns the block's spec, None when the module is not one of
its blocks, or raises UnsupportedModelError when it recognises a block it cannot express. They
are tried in order (the shipped reference model's block, then the transformers families of
hf.py); a module that looks like an MoE block (an `experts` child beside a router) but that no
adapter takes is refused with the reason, never compiled as dense layers.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..spec import MoELayerSpec, UnsupportedModelError
from .hf import KNOWN_UNSUPPORTED, hf_block
from .reference import reference_block

ADAPTERS: list[Callable[[nn.Module, str], MoELayerSpec | None]] = [reference_block, hf_block]


def find_moe_layers(model: nn.Module) -> list[MoELayerSpec]:
    """Every MoE block of `model`, outermost first, in module order."""
    specs: list[MoELayerSpec] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue
        spec = next((s for a in ADAPTERS if (s := a(module, path)) is not None), None)
        if spec is not None:
            specs.append(spec)
            claimed.append(path)
        elif _looks_like_moe(module):
            raise UnsupportedModelError(
                f"{type(module).__name__} at {path!r} looks like an MoE block but is not supported: "
                f"{_why_unsupported(module)}. Supported: the reference MoEBlock and the transformers "
                f"blocks listed in moetvm.compiler.adapters.hf.FAMILIES"
            )
    return specs


def _router_child(module: nn.Module) -> str | None:
    return next((a for a in ("gate", "router") if isinstance(getattr(module, a, None), (nn.Module, nn.Parameter))), None)


def _looks_like_moe(module: nn.Module) -> bool:
    """An `experts` child (a ModuleList, or a fused-experts module beside a gate/router)."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    return isinstance(experts, nn.ModuleList) or _router_child(module) is not None or any(
        isinstance(p, nn.Parameter) and p.dim() == 3 for p in experts.parameters(recurse=False))


def _why_unsupported(module: nn.Module) -> str:
    name = type(module).__name__
    if name in KNOWN_UNSUPPORTED:
        return KNOWN_UNSUPPORTED[name]
    experts = type(module.experts).__name__
    router = _router_child(module)
    return (f"no adapter knows this block class (experts: {experts}, router: "
            f"{type(getattr(module, router)).__name__ if router else 'none found'})")
