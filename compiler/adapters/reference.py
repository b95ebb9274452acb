"""The shipped reference model's MoE block (compiler/models/reference.py)."""

from __future__ import annotations

from torch import nn

from ..spec import ExpertWeights, MoELayerSpec, to_numpy


def reference_block(module: nn.Module, path: str) -> MoELayerSpec | None:
    from ..models.reference import MoEBlock

    if not isinstance(module, MoEBlock):
        return None
    experts = [ExpertWeights(to_numpy(e.w_gate.weight), to_numpy(e.w_up.weight), to_numpy(e.w_down.weight))
               for e in module.experts]
    return MoELayerSpec(path=path, router_weight=to_numpy(module.router.weight), top_k=module.top_k, experts=experts)
