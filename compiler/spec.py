"""The canonical MoE layer spec, and the adapters that recognise MoE blocks structurally.

Every supported MoE block, whatever its source model, is described by one `MoELayerSpec`: router
weights and bias/correction terms, score function, top-k (optionally grouped), renormalisation,
routed scaling factor, shared experts with an optional sigmoid gate, and the expert FFN weights.
That covers Mixtral (softmax, renormalised top-2), Qwen2-MoE (shared expert with its own sigmoid
gate, no renormalisation), OLMoE (softmax top-8) and DeepSeek-V3 (sigmoid scores, selection bias,
grouped top-k, routed scaling), and the transformers families that reuse their routers
(hf_adapters.py). Adapters are tried in order; the first that accepts a module translates it; an
adapter that recognises a module it cannot express raises UnsupportedModelError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn

from moetvm.errors import MoetvmError
from moetvm.artifact import Router


class UnsupportedModelError(MoetvmError, ValueError):
    """The model (or one of its MoE blocks) has a structure no adapter understands."""


@dataclass
class ExpertWeights:
    """A gated FFN expert: down(act(x @ gate^T) * (x @ up^T)); PyTorch (out, in) layout."""

    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    kind: str = "swiglu"

    @property
    def d_model(self) -> int:
        return self.w_gate.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_gate.shape[0]


@dataclass
class MoELayerSpec:
    path: str  # module path inside the source model
    router_weight: np.ndarray  # (n_experts, d_model)
    top_k: int
    experts: list[ExpertWeights]
    score_fn: str = "softmax"
    normalize: bool = True
    router_bias: np.ndarray | None = None
    selection_bias: np.ndarray | None = None
    n_groups: int = 1
    top_groups: int = 1
    group_score: str = "top2_sum"  # a group's rank: sum of its 2 best scores (DeepSeek-V3) | "max" (V2)
    scaling: float = 1.0
    shared: list[ExpertWeights] = field(default_factory=list)
    shared_gate_weight: np.ndarray | None = None  # (1, d_model): sigmoid gate on the shared expert

    @property
    def n_experts(self) -> int:
        return self.router_weight.shape[0]

    def router(self, **fields) -> Router:
        """This layer's routing as the artifact's Router entry; `fields` sets the rest (library,
        function, mode and its tables, masked experts)."""
        bias = None if self.selection_bias is None else [float(v) for v in np.asarray(self.selection_bias)]
        return Router(**{"library": "", "function": "", "n_experts": self.n_experts, "top_k": self.top_k,
                         "score_fn": self.score_fn, "normalize": self.normalize, "n_groups": self.n_groups,
                         "top_groups": self.top_groups, "group_score": self.group_score,
                         "scaling": float(self.scaling), "selection_bias": bias, **fields})

    @property
    def d_model(self) -> int:
        return self.router_weight.shape[1]


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _reference_block(module: nn.Module, path: str) -> MoELayerSpec | None:
    from .models.reference import MoEBlock

    if not isinstance(module, MoEBlock):
        return None
    experts = [ExpertWeights(_np(e.w_gate.weight), _np(e.w_up.weight), _np(e.w_down.weight)) for e in module.experts]
    return MoELayerSpec(path=path, router_weight=_np(module.router.weight), top_k=module.top_k, experts=experts)


# Adapters: module -> spec, or None when the module is not theirs. Model families add theirs here.
ADAPTERS: list[Callable[[nn.Module, str], MoELayerSpec | None]] = [_reference_block]


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
    from .hf_adapters import KNOWN_UNSUPPORTED

    name = type(module).__name__
    if name in KNOWN_UNSUPPORTED:
        return KNOWN_UNSUPPORTED[name]
    experts = type(module.experts).__name__
    router = _router_child(module)
    return (f"no adapter knows this block class (experts: {experts}, router: "
            f"{type(getattr(module, router)).__name__ if router else 'none found'})")


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
                f"blocks listed in moetvm.compiler.hf_adapters.FAMILIES"
            )
    return specs


from .hf_adapters import hf_block  # noqa: E402 - hf_adapters builds on the classes above

ADAPTERS.append(hf_block)
