"""transformers MoE blocks read structurally into MoELayerSpec (compiler/adapters/hf.py).

Each family: a tiny random-weight model built locally, one MoE block taken from it, its weights
re-randomised (routers, biases and correction terms often start at zero, which would let a wrong
reading pass), and the spec evaluated in NumPy with the runtime's routing code against the
block's own torch forward. One slow test compiles representative blocks and runs them.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch

from moetvm.artifact import Router
from moetvm.compiler import UnsupportedModelError, find_moe_layers
from moetvm.compiler.adapters.hf import FAMILIES
from moetvm.routing import group_by_expert, select_experts

from moetvm.verify import relative_error

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")

BLOCK_CLASSES = {name for fam in FAMILIES for name in fam.blocks}
BASE = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0, kv_lora_rank=16,
                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
QWEN = dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])

# model_type -> config overrides (on top of BASE); a block class instead of a whole model where
# the model needs more than a small config to build (its MoE block does not).
CASES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2),
    "qwen2_moe": dict(QWEN, shared_expert_intermediate_size=40, norm_topk_prob=False),
    "qwen3_next": dict(QWEN, shared_expert_intermediate_size=40, norm_topk_prob=True),
    "qwen3_moe": dict(QWEN, norm_topk_prob=True),
    "mellum": dict(QWEN, norm_topk_prob=False),
    "olmoe": dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=1, attn_layer_offset=0),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=3),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=3, shared_intermediate_size=40),
    "granitemoehybrid": dict(num_local_experts=8, num_experts_per_tok=3, layer_types=["attention"]),
    "deepseek_v3": DEEPSEEK,
    "dots1": dict(DEEPSEEK, n_group=2, topk_group=1, num_experts_per_tok=2),
    "glm4_moe": dict(DEEPSEEK, norm_topk_prob=False, routed_scaling_factor=1.5),
    "glm4_moe_lite": dict(DEEPSEEK, num_hidden_layers=2, mlp_layer_types=["dense", "sparse"]),
    "solar_open": dict(DEEPSEEK, n_group=1, topk_group=1),
    "exaone_moe": dict(DEEPSEEK, num_experts=8),
    "deepseek_v32": dict(DEEPSEEK),
    "glm_moe_dsa": dict(DEEPSEEK),
    "kimi_linear": dict(DEEPSEEK, num_experts=8, moe_layer_freq=1),
    "deepseek_v2": dict(DEEPSEEK, topk_method="greedy"),
    "deepseek_v2/group_limited_greedy": dict(DEEPSEEK, topk_method="group_limited_greedy"),
    "cohere2_moe": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, expert_selection_fn="softmax"),
    "cohere2_moe/sigmoid_average": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                                        expert_selection_fn="sigmoid", norm_topk_prob=True,
                                        shared_expert_combination_strategy="average"),
    # "average" with no shared expert leaves the routed output as it is (found by hf_families.py).
    "cohere2_moe/average_without_shared": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=0,
                                               shared_expert_combination_strategy="average"),
    "ernie4_5_moe": dict(num_experts=8, num_experts_per_tok=2, moe_num_shared_experts=1, moe_layer_start_index=0,
                         moe_layer_interval=1),
    "lfm2_moe": dict(num_experts=8, num_experts_per_tok=3, num_dense_layers=0, layer_types=["full_attention"],
                     routed_scaling_factor=1.7),
    "afmoe": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1, num_dense_layers=0, route_scale=1.3),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=3),
    "qwen3_5_moe_text": dict(QWEN, shared_expert_intermediate_size=40, layer_types=["full_attention"]),
    "qwen3_vl_moe_text": dict(QWEN),
    "lara_mini": dict(QWEN, shared_expert_intermediate_size=40, norm_topk_prob=False),
    "flint": dict(QWEN, shared_expert_intermediate_size=40, norm_topk_prob=True),
    "laguna": dict(QWEN, shared_expert_intermediate_size=40, moe_routed_scaling_factor=1.7,
                   moe_router_logit_softcapping=0.0, mlp_layer_types=["sparse"]),
    "mistral4": dict(DEEPSEEK, num_local_experts=8, norm_topk_prob=False),
    "mistral_large4_text": dict(DEEPSEEK, num_local_experts=8),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=1, vocab_size=64,
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
}
BLOCK_ONLY = {"dbrx": "DbrxFFN"}  # its attention config needs rope settings a block does not


def _randomise(block: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(block.parameters()) + list(block.buffers()):
            if t.is_floating_point():
                scale = 0.3 if t.dim() < 2 else 1.0 / np.sqrt(t.shape[-1])
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def tiny_block(case: str, seed: int = 0) -> torch.nn.Module:
    model_type = case.split("/")[0]
    config = transformers.CONFIG_MAPPING[model_type](**{**BASE, **CASES[case]})
    torch.manual_seed(seed)
    if model_type in BLOCK_ONLY:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        block = getattr(module, BLOCK_ONLY[model_type])(config)
    else:
        model = transformers.AutoModel.from_config(config)
        block = next(m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES)
    _randomise(block, seed)
    return block.eval()


def _silu(z):
    return z / (1 + np.exp(-z))


def _ffn(e, x):
    return (_silu(x @ e.w_gate.T) * (x @ e.w_up.T)) @ e.w_down.T


def spec_forward(spec, x: np.ndarray) -> np.ndarray:
    """MoELayerSpec semantics in NumPy, routing through the runtime's own select_experts."""
    logits = x @ spec.router_weight.T + (0 if spec.router_bias is None else spec.router_bias)
    if spec.score_fn == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    indices, weights = select_experts(scores.astype(np.float32), spec.router())
    out = np.zeros_like(x)
    for expert, rows, w in group_by_expert(indices, weights):
        out[rows] += _ffn(spec.experts[expert], x[rows]) * w[:, None]
    for shared in spec.shared:
        y = _ffn(shared, x)
        if spec.shared_gate_weight is not None:
            y = y / (1 + np.exp(-(x @ spec.shared_gate_weight.T)))
        out += y
    return out


def torch_forward(block, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = block(torch.from_numpy(x))
    return (y[0] if isinstance(y, tuple) else y).numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_spec_matches_torch(case):
    block = tiny_block(case)
    (spec,) = find_moe_layers(block)
    assert spec.path == "" and spec.n_experts == 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 64)).astype(np.float32)
    ours = spec_forward(spec, x.reshape(-1, 64)).reshape(x.shape)
    assert relative_error(ours, torch_forward(block, x)) < 1e-5


def test_spec_reads_routing_switches():
    """The readings the numeric check could pass by luck are pinned explicitly."""
    (v3,) = find_moe_layers(tiny_block("deepseek_v3"))
    assert (v3.score_fn, v3.n_groups, v3.top_groups, v3.scaling, v3.normalize) == ("sigmoid", 4, 2, 2.5, True)
    assert v3.selection_bias is not None and len(v3.shared) == 1
    (qwen,) = find_moe_layers(tiny_block("qwen2_moe"))
    assert not qwen.normalize and qwen.shared_gate_weight.shape == (1, 64)
    (v2,) = find_moe_layers(tiny_block("deepseek_v2/group_limited_greedy"))
    assert (v2.group_score, v2.n_groups, v2.normalize) == ("max", 4, False)


def test_group_score_max_changes_selection():
    """A group's max and the sum of its top 2 rank groups differently on this input."""
    scores = np.array([[0.9, 0.0, 0.5, 0.5]], np.float32)
    common = dict(library="", function="", n_experts=4, top_k=1, score_fn="sigmoid", normalize=False,
                  n_groups=2, top_groups=1)
    assert select_experts(scores, Router(**common, group_score="max"))[0][0, 0] == 0
    assert select_experts(scores, Router(**common))[0][0, 0] in (2, 3)


def test_refuses_a_block_that_breaks_an_assumption():
    block = tiny_block("mixtral")
    block.experts.act_fn = torch.nn.GELU()
    with pytest.raises(UnsupportedModelError, match="MixtralSparseMoeBlock.*not SiLU"):
        find_moe_layers(block)


@pytest.mark.parametrize("model_type,config,reason", [
    ("kolibri1", dict(num_local_experts=8, num_experts=8, num_experts_per_tok=2), "Kolibri1SparseMoeBlock.*before the sigmoid"),
    ("nemotron_h", dict(n_routed_experts=8, num_experts_per_tok=2, moe_latent_size=32), "NemotronHMoE.*latent space"),
])
def test_unsupported_blocks_are_named(model_type, config, reason):
    cfg = transformers.CONFIG_MAPPING[model_type](**{**BASE, **config})
    model = transformers.AutoModel.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match=reason):
        find_moe_layers(model)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2_moe", "deepseek_v3", "deepseek_v2/group_limited_greedy"])
def test_compiled_block_matches_torch(case, tmp_path):
    from moetvm.compiler import compile_model
    from moetvm.runtime import load_model

    block = tiny_block(case)
    out = compile_model(block, (torch.zeros(2, 5, 64),), target="host", out=tmp_path / "block", progress=False)
    model = load_model(out, cache_budget="30%")  # below the total: experts get evicted
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 64), (2, 9, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert relative_error(model(x), torch_forward(block, x)) < 1e-5
    assert model.stats()["evictions"] > 0
