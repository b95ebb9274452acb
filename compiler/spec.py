"""The canonical MoE layer spec: what every front door reads an MoE block into.

Every supported MoE block, whatever its source model, is described by one `MoELayerSpec`: router
weights and bias/correction terms, score function, top-k (optionally grouped), renormalisation,
routed scaling factor, shared experts with an optional sigmoid gate, and the expert FFN weights.
That covers Mixtral (softmax, renormalised top-2), Qwen2-MoE (shared expert with its own sigmoid
gate, no renormalisation), OLMoE (softmax top-8) and DeepSeek-V3 (sigmoid scores, selection bias,
grouped top-k, routed scaling), and the transformers families that reuse their routers
(adapters/hf.py). Pure data with its checks: the adapters (adapters/) and the ONNX importer
fill it in, `MoELayerSpec.problem()` says what a block that does not fit it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetvm.errors import MoetvmError
from moetvm.artifact import Router

from .checkpoint import checkpoint_source


class UnsupportedModelError(MoetvmError, ValueError):
    """The model (or one of its MoE blocks) has a structure no adapter understands."""


@dataclass
class ExpertWeights:
    """An FFN expert, PyTorch (out, in) layout: gated, down(act(x @ gate^T) * (x @ up^T)), or
    plain (w_gate None), down(act(x @ up^T))."""

    w_gate: np.ndarray | None
    w_up: np.ndarray
    w_down: np.ndarray
    # quant.SWIGLU, quant.clamped_kind(alpha, limit) (GPT-OSS) or quant.plain_kind(activation, biases) (NemotronH)
    kind: str = "swiglu"
    biases: tuple | None = None  # quant.bias_names(kind) in order: clamped (gate, up, down), plain (up, down)

    @property
    def d_model(self) -> int:
        return self.w_up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_up.shape[0]


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
    jitter_eps: float = 0.0  # sparsemixer routing (PhiMoE): see routing.sparsemixer
    returns_tuple: bool = False  # the block returns (hidden, router scores) (GPT-OSS)
    scale_input: bool = False  # the weights scale each expert's input, not its output (Llama 4)

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
                         "scaling": float(self.scaling), "selection_bias": bias,
                         "jitter_eps": float(self.jitter_eps), "scale_input": self.scale_input, **fields})

    @property
    def d_model(self) -> int:
        return self.router_weight.shape[1]

    def problem(self) -> str | None:
        """What makes this spec inconsistent (expert count, hidden sizes, top-k, groups), or None."""
        n, d = self.router_weight.shape
        if len(self.experts) != n:
            return f"router scores {n} experts but the block holds {len(self.experts)}"
        if any(e.d_model != d or e.w_down.shape[0] != d for e in self.experts + self.shared):
            return "expert and router hidden sizes differ"
        if not 0 < self.top_k <= n:
            return f"top_k={self.top_k} for {n} experts"
        if self.score_fn == "sparsemixer" and (self.top_k != 2 or self.n_groups > 1 or self.selection_bias is not None):
            return f"sparsemixer routing picks 2 experts, ungrouped and unbiased (top_k={self.top_k})"
        if self.n_groups > 1 and (n % self.n_groups or not 0 < self.top_groups <= self.n_groups):
            return f"n_group={self.n_groups}/topk_group={self.top_groups} do not fit {n} experts"
        if self.n_groups > 1 and self.top_groups * (n // self.n_groups) < self.top_k:
            return f"top_k={self.top_k} exceeds the experts of the {self.top_groups} kept groups"
        return None


def experts_from_fused(gate_up: np.ndarray, down: np.ndarray) -> list[ExpertWeights]:
    """Experts stored fused, as transformers' experts implementations (and ONNX exports of them)
    keep them: gate_up (E, 2I, H), whose output's first half is the gate and second the up
    projection, and down (E, H, I). UnsupportedModelError for other shapes."""
    d_ff = gate_up.shape[1] // 2 if gate_up.ndim == 3 else 0
    if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[1] != 2 * d_ff or down.shape != (gate_up.shape[0], gate_up.shape[2], d_ff):
        raise UnsupportedModelError(f"expert tensors {tuple(gate_up.shape)} and {tuple(down.shape)} are not gate_up "
                                    f"(E, 2I, H) and down (E, H, I)")
    return [ExpertWeights(gate_up[e, :d_ff].copy(), gate_up[e, d_ff:].copy(), down[e].copy()) for e in range(gate_up.shape[0])]


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor's values as a float32 NumPy array of its own (a parameter streamed from its
    checkpoint, compiler/checkpoint.py, read from there)."""
    source = checkpoint_source(tensor)
    if source is not None:
        return np.asarray(source)
    return tensor.detach().float().cpu().numpy().copy()


def expert_weight(tensor):
    """An expert's weight matrix: a streamed parameter's `LazyTensor` (read when quantized and
    written, one expert at a time), else its values."""
    source = checkpoint_source(tensor)
    return source if source is not None else to_numpy(tensor)
