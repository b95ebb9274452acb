"""Adapters for the MoE blocks of Hugging Face transformers model families.

Each family's block is recognised by its class (name, defined under `transformers.`) and read
structurally from its parameters and config attributes into a `MoELayerSpec`; nothing is traced.
Transformers' modular code generation copies a handful of routers across families, so a small
table maps block classes to one of a few routing readers:

  softmax top-k        Mixtral, MiniMax, HunYuan-V1 (always renormalised), Qwen2/3-MoE, OLMoE,
                       FlexOlmo, Mellum, Qwen3-Next (norm_topk_prob), Jamba (never renormalised)
  top-k of logits      GraniteMoE*: softmax over the k best logits == softmax, top-k, renormalise
  sigmoid, grouped     DeepSeek-V3 and its copies (GLM-4-MoE, dots1, Solar-Open, EXAONE-MoE, ...):
                       e_score_correction_bias for selection, n_group/topk_group, routed scaling
  softmax, grouped     Mistral-4 / Mistral-Large-4 (V3's grouping over softmax, no bias)
  one-off readers      DeepSeek-V2 (softmax, greedy or group max), Cohere2-MoE, ERNIE-4.5-MoE,
                       LFM2-MoE, AFMoE, MiniMax-M2, DBRX
  sparsemixer          PhiMoE: two sequential picks, each with a jitter-masked softmax
  biased top-k         GPT-OSS (clamped SwiGLU experts with biases: their own workload kind)
  input-scaled         Llama 4: sigmoid of the k best logits scales each expert's input
  V3's router, plain   NemotronH (gateless relu^2 experts and shared expert: the plain kind)

Expert FFNs: transformers 5 stores a family's experts fused (`gate_up_proj` (E, 2I, H) with the
gate rows first, `down_proj` (E, H, I); `is_transposed` experts store (E, in, out)). Every
assumption the runtime relies on (SiLU gate, no biases, no post-expert norm, the default gate
function, the config's routing switches) is checked, and a block that breaks one is refused with
an UnsupportedModelError that names its class and what is missing.

transformers is optional: nothing here imports it; classes are matched by name and module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..checkpoint import FusedExperts, checkpoint_source
from ..quant import ACTIVATIONS, clamped_kind, plain_kind
from ..spec import ExpertWeights, MoELayerSpec, UnsupportedModelError, expert_weight, experts_from_fused, to_numpy


class _Refusal(Exception):
    """Raised by readers; turned into an UnsupportedModelError naming the block and its path."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Refusal(what)


_PROBE = torch.linspace(-8.0, 8.0, 33)


def _is_silu(fn) -> bool:
    """Whether `fn` computes x * sigmoid(x): checked on values, so any SiLU spelling passes
    (nn.SiLU, F.silu, transformers' SiLUActivation) and nothing else does."""
    try:
        with torch.no_grad():
            y = fn(_PROBE.clone())
    except Exception:  # noqa: BLE001 - not a plain elementwise function: not SiLU
        return False
    return isinstance(y, torch.Tensor) and torch.allclose(y, _PROBE * torch.sigmoid(_PROBE), atol=1e-6)


def _activation(fn) -> str | None:
    """The name (quant.ACTIVATIONS) of the elementwise function `fn` computes, checked on values
    as _is_silu is; None when it is none of them."""
    try:
        with torch.no_grad():
            y = fn(_PROBE.clone())
    except Exception:  # noqa: BLE001 - not a plain elementwise function
        return None
    if not isinstance(y, torch.Tensor):
        return None
    x = _PROBE.double().numpy()
    return next((name for name, ref in ACTIVATIONS.items()
                 if np.allclose(y.double().numpy(), ref(x), rtol=1e-5, atol=1e-6)), None)


def _linear_weight(layer: nn.Module, what: str, read=to_numpy) -> np.ndarray:
    _require(isinstance(layer, nn.Linear), f"{what} is a {type(layer).__name__}, not a Linear")
    _require(layer.bias is None, f"{what} has a bias (the expert kernels have none)")
    return read(layer.weight)


def _mlp(mlp: nn.Module, what: str) -> ExpertWeights:
    """A dense MLP: a shared expert. Gated (gate_proj/up_proj/down_proj, SiLU, no biases), or
    plain (up_proj/down_proj, any of quant.ACTIVATIONS, biases on both or neither: NemotronH's)."""
    act = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
    if not hasattr(mlp, "gate_proj") and all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("up_proj", "down_proj")):
        name = _activation(act)
        _require(name is not None, f"{what} activation is none of {', '.join(ACTIVATIONS)}")
        up, down = mlp.up_proj, mlp.down_proj
        _require((up.bias is None) == (down.bias is None), f"{what}: only one of up_proj and down_proj has a bias")
        biases = None if up.bias is None else (to_numpy(up.bias), to_numpy(down.bias))
        return ExpertWeights(None, expert_weight(up.weight), expert_weight(down.weight),
                             kind=plain_kind(name, biases is not None), biases=biases)
    _require(all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")),
             f"{what} ({type(mlp).__name__}) is not a gate_proj/up_proj/down_proj MLP")
    _require(_is_silu(act), f"{what} activation is not SiLU")
    return ExpertWeights(_linear_weight(mlp.gate_proj, f"{what}.gate_proj", expert_weight),
                         _linear_weight(mlp.up_proj, f"{what}.up_proj", expert_weight),
                         _linear_weight(mlp.down_proj, f"{what}.down_proj", expert_weight))


def _fused_experts(experts: nn.Module, transposed: bool | None = None) -> list[ExpertWeights]:
    """Experts stored as 3D tensors by transformers' `use_experts_implementation` classes;
    `transposed`: stored (E, in, out) (default: the experts' `is_transposed`)."""
    _require(hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"),
             f"experts ({type(experts).__name__}) are not fused gate_up_proj/down_proj tensors")
    _require(getattr(experts, "has_gate", True), "experts have no gate projection (not a gated FFN)")
    _require(not getattr(experts, "has_bias", False), "experts have biases")
    _require(not getattr(experts, "has_post_expert_norm", False), "experts apply a norm after each expert")
    _require(getattr(experts, "is_concatenated", True), "experts interleave gate and up rows")
    apply_gate = getattr(type(experts), "_apply_gate", None)
    _require(apply_gate is None or apply_gate.__name__ == "_default_apply_gate",
             f"experts override the gate function ({type(experts).__name__}._apply_gate: clamping, limits, ...)")
    _require(_is_silu(getattr(experts, "act_fn", None)), "expert activation is not SiLU")
    transposed = getattr(experts, "is_transposed", False) if transposed is None else transposed
    streamed = checkpoint_source(experts.gate_up_proj), checkpoint_source(experts.down_proj)
    if all(isinstance(s, FusedExperts) for s in streamed):  # read one expert at a time, when used
        gate_up, down = streamed
        d_ff = (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2
        return [ExpertWeights(gate_up.lazy(e, slice(0, d_ff), transposed), gate_up.lazy(e, slice(d_ff, 2 * d_ff), transposed),
                              down.lazy(e, slice(None), transposed)) for e in range(gate_up.shape[0])]
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if transposed:  # (E, in, out) -> PyTorch's (E, out, in)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    try:  # the default gate function chunks gate_up's output in two: gate rows first, then up rows
        return experts_from_fused(to_numpy(gate_up), to_numpy(down))
    except UnsupportedModelError as e:
        raise _Refusal(str(e)) from None


def _gpt_oss_experts(experts: nn.Module) -> list[ExpertWeights]:
    """GPT-OSS: gate_up_proj (E, H, 2I) as x @ w, gate and up columns interleaved (gate even),
    with biases; down_proj (E, I, H); the gate clamped (alpha, limit: the workload kind).
    Streamed from a checkpoint, each expert's weights are read when it is quantized (its
    transpose's even rows are the gate's, odd rows the up's); the biases, small, are read whole."""
    kind = clamped_kind(float(experts.alpha), float(experts.limit))
    gate_up_bias, down_bias = to_numpy(experts.gate_up_proj_bias), to_numpy(experts.down_proj_bias)
    biases = [(gate_up_bias[e, 0::2].copy(), gate_up_bias[e, 1::2].copy(), down_bias[e].copy())
              for e in range(gate_up_bias.shape[0])]
    streamed = checkpoint_source(experts.gate_up_proj), checkpoint_source(experts.down_proj)
    if all(isinstance(s, FusedExperts) for s in streamed):
        gate_up, down = streamed
        return [ExpertWeights(gate_up.lazy(e, slice(0, None, 2), transposed=True),
                              gate_up.lazy(e, slice(1, None, 2), transposed=True),
                              down.lazy(e, slice(None), transposed=True), kind=kind, biases=biases[e])
                for e in range(gate_up.shape[0])]
    _require(all(s is None for s in streamed), "gate_up_proj and down_proj are not both fused checkpoint tensors")
    gate_up, down = to_numpy(experts.gate_up_proj), to_numpy(experts.down_proj)
    return [ExpertWeights(gate_up[e, :, 0::2].T.copy(), gate_up[e, :, 1::2].T.copy(), down[e].T.copy(), kind=kind,
                          biases=biases[e]) for e in range(gate_up.shape[0])]


def _plain_experts(experts: nn.Module) -> list[ExpertWeights]:
    """NemotronH: gateless experts, up_proj (E, I, H) -> activation -> down_proj (E, H, I), no
    biases (the plain kind); streamed, each expert is read when it is quantized."""
    _require(not hasattr(experts, "gate_up_proj") and hasattr(experts, "up_proj") and hasattr(experts, "down_proj"),
             f"experts ({type(experts).__name__}) are not up_proj/down_proj tensors")
    _require(not getattr(experts, "has_bias", False), "experts have biases")
    name = _activation(getattr(experts, "act_fn", None))
    _require(name is not None, f"expert activation is none of {', '.join(ACTIVATIONS)}")
    kind = plain_kind(name, False)
    streamed = checkpoint_source(experts.up_proj), checkpoint_source(experts.down_proj)
    if all(isinstance(s, FusedExperts) for s in streamed):
        up, down = streamed
        return [ExpertWeights(None, up.lazy(e, slice(None), False), down.lazy(e, slice(None), False), kind=kind)
                for e in range(up.shape[0])]
    _require(all(s is None for s in streamed), "up_proj and down_proj are not both 3-D checkpoint tensors")
    up, down = to_numpy(experts.up_proj), to_numpy(experts.down_proj)
    return [ExpertWeights(None, up[e], down[e], kind=kind) for e in range(up.shape[0])]


def _dbrx_experts(experts: nn.Module) -> list[ExpertWeights]:
    """DBRX keeps w1 (gate), v1 (up) as (E*F, H) and w2 as (E*F, H) used as x @ w2: (in, out)."""
    glu = experts.mlp
    _require(_is_silu(glu.activation_fn), "expert activation (ffn_act_fn) is not SiLU")
    n, d_ff = experts.num_experts, experts.ffn_hidden_size
    w1, v1, w2 = (to_numpy(t).reshape(n, d_ff, -1) for t in (glu.w1, glu.v1, glu.w2))
    return [ExpertWeights(w1[e], v1[e], w2[e].T.copy()) for e in range(n)]


# --- routing readers: router module (+ block) -> MoELayerSpec routing fields ------------------
def _router_weight(router: nn.Module) -> np.ndarray:
    if isinstance(router, nn.Linear):
        _require(router.bias is None, "the router has a bias")
        return to_numpy(router.weight)
    for name in ("weight", "wg", "gate", "layer", "classifier"):  # families name it differently
        w = getattr(router, name, None)
        if isinstance(w, nn.Parameter):
            return to_numpy(w)
        if isinstance(w, nn.Linear):
            return _linear_weight(w, f"router.{name}")
    raise _Refusal(f"router {type(router).__name__} has no weight this adapter knows")


def _softmax_topk(normalize: bool | str) -> Callable:
    """softmax -> top-k -> optionally renormalised; `normalize` a bool or the router attribute
    that holds it (norm_topk_prob)."""

    def read(router, block):
        norm = normalize if isinstance(normalize, bool) else bool(getattr(router, normalize))
        return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="softmax", normalize=norm)

    return read


def _logit_topk_softmax(router, block):
    # softmax over the k best logits equals softmax over all, top-k, renormalised (softmax is
    # monotonic and the shared normaliser cancels).
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="softmax", normalize=True)


def _sigmoid_grouped(router, block):
    """DeepSeek-V3's router, copied verbatim by many families."""
    n = router.num_experts
    _require(n % router.num_group == 0, f"{n} experts do not split into n_group={router.num_group}")
    _require(router.num_group == 1 or n // router.num_group >= 2, "groups of one expert have no top-2 sum")
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid",
                normalize=bool(router.norm_topk_prob), selection_bias=to_numpy(router.e_score_correction_bias),
                n_groups=int(router.num_group), top_groups=int(router.topk_group),
                scaling=float(router.routed_scaling_factor))


def _nemotron_h(router, block):
    """NemotronH's router is DeepSeek-V3's; a latent projection around the experts (moe_latent_size)
    is outside the spec."""
    _require(all(isinstance(getattr(block, p, None), nn.Identity) for p in ("fc1_latent_proj", "fc2_latent_proj")),
             "experts run in a projected latent space (moe_latent_size)")
    return _sigmoid_grouped(router, block)


def _softmax_grouped(normalize: bool | str) -> Callable:
    """Mistral-4: DeepSeek-V3's grouping (top-2 sums) over softmax scores, no correction bias;
    masking to 0 instead of -inf selects the same experts since softmax scores are positive."""

    def read(router, block):
        norm = normalize if isinstance(normalize, bool) else bool(getattr(router, normalize))
        return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="softmax", normalize=norm,
                    n_groups=int(router.num_group), top_groups=int(router.topk_group),
                    scaling=float(router.routed_scaling_factor))

    return read


def _sigmoid_topk(router, block):
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid",
                normalize=bool(router.norm_topk_prob))


def _laguna(router, block):
    # Sigmoid + selection bias, renormalised; the block scales the routed sum. A tanh soft cap
    # on the logits is outside the spec.
    cap = router.router_logit_softcapping
    _require(not cap or cap <= 0, f"router logits are soft-capped (moe_router_logit_softcapping={cap})")
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid", normalize=True,
                selection_bias=to_numpy(router.e_score_correction_bias), scaling=float(block.routed_scaling_factor))


def _deepseek_v2(router, block):
    # Softmax scores, never renormalised; group_limited_greedy ranks a group by its best expert
    # (masked experts get 0, below every softmax score, so masking to -inf selects the same).
    method = router.topk_method
    _require(method in ("greedy", "group_limited_greedy"), f"topk_method {method!r} is not greedy/group_limited_greedy")
    grouped = method == "group_limited_greedy"
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="softmax", normalize=False,
                n_groups=int(router.num_group) if grouped else 1, top_groups=int(router.topk_group) if grouped else 1,
                group_score="max" if grouped else "top2_sum", scaling=float(router.routed_scaling_factor))


def _cohere2(router, block):
    # top-k of logits, then softmax over the k (== renormalised softmax) or sigmoid (monotonic,
    # so the same k) renormalised when norm_topk_prob.
    fn = router.expert_selection_fn
    _require(fn in ("softmax", "sigmoid"), f"expert_selection_fn {fn!r}")
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn=fn,
                normalize=fn == "softmax" or bool(router.norm_topk_prob))


def _ernie(router, block):
    # moe_statics adds a selection-only correction bias; weights are renormalised (clamped below
    # at norm_min, far under any top-k softmax sum).
    bias = to_numpy(router.moe_statics.e_score_correction_bias).reshape(-1)
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="softmax", normalize=True,
                selection_bias=bias)


def _lfm2(router, block):
    # Sigmoid, optional selection bias held by the block; renormalisation adds 1e-6 to the sum
    # (a relative 1e-6 / sum(top-k sigmoids) difference, well inside fp32 tolerance).
    bias = to_numpy(block.expert_bias) if getattr(block, "use_expert_bias", False) else None
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid",
                normalize=bool(router.norm_topk_prob), selection_bias=bias,
                scaling=float(router.routed_scaling_factor))


def _afmoe(router, block):
    return dict(router_weight=_router_weight(router.gate), top_k=router.top_k, score_fn="sigmoid", normalize=True,
                selection_bias=to_numpy(block.expert_bias), scaling=float(router.route_scale))


def _minimax_m2(router, block):
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid", normalize=True,
                selection_bias=to_numpy(block.e_score_correction_bias))


def _dbrx(router, block):
    # Weights are divided by their p-norm; for positive weights p=1 is renormalisation.
    p = block.moe_normalize_expert_weights
    _require(p in (None, 1, 1.0), f"moe_normalize_expert_weights={p} (only 1 (sum) or None is renormalisation)")
    return dict(router_weight=_router_weight(router.layer), top_k=block.top_k, score_fn="softmax",
                normalize=p is not None)


def _sparsemixer(router, block):
    # PhiMoE: two sequential picks from the logits, each weighted by a jitter-masked softmax
    # (its inference form; training samples instead). Always two experts.
    _require(router.top_k == 2, f"sparsemixer picks 2 experts, not num_experts_per_tok={router.top_k}")
    return dict(router_weight=_router_weight(router), top_k=2, score_fn="sparsemixer", normalize=False,
                jitter_eps=float(router.router_jitter_noise))


def _gpt_oss_router(router, block):
    # A biased linear router; softmax over the k best logits == softmax, top-k, renormalised.
    return dict(router_weight=_router_weight(router), router_bias=to_numpy(router.bias), top_k=router.top_k,
                score_fn="softmax", normalize=True)


def _llama4(router, block):
    # Sigmoid of the k best logits, each scaling its expert's *input* (Llama4TextMoe: experts
    # of a zero input give zero, so the unselected ones drop out); outputs summed unweighted.
    return dict(router_weight=_router_weight(router), top_k=router.top_k, score_fn="sigmoid", normalize=False,
                scale_input=True)


def _cohere2_shared_scale(block) -> float:
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    _require(strategy in ("sum", "average"), f"shared_expert_combination_strategy {strategy!r}")
    # "average" halves (routed + shared) only when there is a shared expert to average with.
    return 0.5 if strategy == "average" and getattr(block, "num_shared_experts", 0) > 0 else 1.0


@dataclass(frozen=True)
class Family:
    blocks: tuple[str, ...]  # block class names (transformers' modular copies share a reader)
    router: str  # the block's router attribute
    routing: Callable  # (router, block) -> MoELayerSpec routing fields
    shared: str | None = None  # the block's shared-expert MLP attribute (absent or None: no shared expert)
    shared_gate: str | None = None  # Linear(hidden, 1) whose sigmoid scales the shared expert
    experts: Callable = _fused_experts
    # Whole-output scale (Cohere2 "average" mode): exact in fp32 for powers of two, folded into
    # the routed scaling and the shared experts' down projections.
    output_scale: Callable | None = None
    returns_tuple: bool = False  # the block returns (hidden, router scores)


_SOFTMAX_RENORM, _SOFTMAX_NORM_ATTR = _softmax_topk(True), _softmax_topk("norm_topk_prob")

FAMILIES: list[Family] = [
    Family(("MixtralSparseMoeBlock", "MiniMaxSparseMoeBlock"), "gate", _SOFTMAX_RENORM),
    Family(("HunYuanMoEV1Moe",), "gate", _SOFTMAX_RENORM, shared="shared_mlp"),
    Family(("Qwen2MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock", "Qwen3OmniMoeTalkerTextSparseMoeBlock",
            "Qwen4ExpTextSparseMoeBlock"), "gate", _SOFTMAX_NORM_ATTR,
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family(("Qwen3_5MoeSparseMoeBlock",), "gate", _SOFTMAX_RENORM,
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family(("Qwen3VLMoeTextSparseMoeBlock",), "gate", _SOFTMAX_RENORM),
    Family(("LaraMiniSparseMoeBlock",), "gate", _SOFTMAX_NORM_ATTR, shared="shared_expert"),
    Family(("FlintSparseMoeBlock",), "gate", _sigmoid_topk, shared="shared_expert"),
    Family(("LagunaSparseMoeBlock",), "gate", _laguna, shared="shared_experts"),
    Family(("Mistral4MoE",), "gate", _softmax_grouped("norm_topk_prob"), shared="shared_experts"),
    Family(("MistralLarge4TextMoE",), "gate", _softmax_grouped(True), shared="shared_experts"),
    Family(("Qwen3MoeSparseMoeBlock", "MellumSparseMoeBlock", "Qwen3OmniMoeThinkerTextSparseMoeBlock",
            "OlmoeSparseMoeBlock", "FlexOlmoSparseMoeBlock"), "gate", _SOFTMAX_NORM_ATTR),
    Family(("JambaSparseMoeBlock",), "router", _softmax_topk(False)),
    Family(("GraniteMoeMoE", "GraniteMoeSharedMoE", "GraniteMoeHybridMoE", "GraniteMoeSWAMoE"), "router",
           _logit_topk_softmax),
    Family(("DeepseekV3MoE", "Dots1MoE", "Glm4MoeMoE", "Glm4MoeLiteMoE", "Glm4vMoeTextMoE", "SolarOpenMoE",
            "ExaoneMoeSparseMoEBlock", "KimiLinearMoE", "BailingHybridMoE", "DeepseekV32MoE", "GlmMoeDsaMoE",
            "Dots3NoteTextMoE"), "gate", _sigmoid_grouped, shared="shared_experts"),
    Family(("DeepseekV2Moe", "DeepseekOcr2TextMoe", "UnlimitedOcrTextMoe"), "gate", _deepseek_v2,
           shared="shared_experts"),
    Family(("Cohere2MoeSparseMoeBlock",), "gate", _cohere2, shared="shared_experts",
           output_scale=_cohere2_shared_scale),
    Family(("Ernie4_5_MoeSparseMoeBlock",), "gate", _ernie, shared="shared_experts"),
    Family(("Lfm2MoeSparseMoeBlock",), "gate", _lfm2),
    Family(("AfmoeSparseMoeBlock",), "router", _afmoe, shared="shared_experts"),
    Family(("MiniMaxM2SparseMoeBlock",), "gate", _minimax_m2),
    Family(("DbrxFFN",), "router", _dbrx, experts=_dbrx_experts),
    Family(("PhimoeSparseMoeBlock",), "router", _sparsemixer),
    Family(("GptOssMLP",), "router", _gpt_oss_router, experts=_gpt_oss_experts, returns_tuple=True),
    Family(("NemotronHMoE",), "gate", _nemotron_h, shared="shared_experts", experts=_plain_experts),
    Family(("Llama4TextMoe",), "router", _llama4, shared="shared_expert",
           experts=lambda experts: _fused_experts(experts, transposed=True), returns_tuple=True),
]
_BY_CLASS = {name: fam for fam in FAMILIES for name in fam.blocks}


def _is_transformers_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def hf_block(module: nn.Module, path: str) -> MoELayerSpec | None:
    """The spec of a transformers MoE block, None when `module` is not one of the table's."""
    family = _BY_CLASS.get(type(module).__name__)
    if family is None or not _is_transformers_class(module):
        return None
    try:
        routing = family.routing(getattr(module, family.router), module)
        experts = family.experts(module.experts)
        shared_mlp = getattr(module, family.shared, None) if family.shared else None
        shared = [] if shared_mlp is None else [_mlp(shared_mlp, family.shared)]
        gate = None
        if family.shared_gate and shared:
            gate = _linear_weight(getattr(module, family.shared_gate), family.shared_gate)
            _require(gate.shape[0] == 1, f"{family.shared_gate} has {gate.shape[0]} outputs, expected 1")
        scale = family.output_scale(module) if family.output_scale else 1.0
    except _Refusal as e:
        raise UnsupportedModelError(f"{type(module).__name__} at {path!r}: {e}") from None
    if scale != 1.0:
        routing["scaling"] = routing.get("scaling", 1.0) * scale
        shared = [ExpertWeights(s.w_gate, s.w_up, s.w_down * np.float32(scale)) for s in shared]
    spec = MoELayerSpec(path=path, experts=experts, shared=shared, shared_gate_weight=gate,
                        returns_tuple=family.returns_tuple, **routing)
    problem = spec.problem()
    if problem:
        raise UnsupportedModelError(f"{type(module).__name__} at {path!r}: {problem}")
    return spec


# Blocks known to be outside the canonical spec, with what they need: a clearer refusal than
# the generic "looks like an MoE block".
KNOWN_UNSUPPORTED = {
    "JetMoeAttention": "mixture of attention heads, not an FFN MoE",
    "NllbMoeSparseMLP": "capacity-limited top-2 with dropped tokens and non-SiLU experts",
    "SwitchTransformersSparseMLP": "capacity-limited top-1 with dropped tokens and non-SiLU experts",
    "Kolibri1SparseMoeBlock": "selection bias is added to the logits, before the sigmoid",
}
