"""Small random-weight Hugging Face transformers MoE models (2 layers, 8 experts, hidden 64), made
locally: no model hub. Weights are drawn wider than transformers' init (std 0.02 would leave
router scores nearly tied, so top-k could flip on rounding) and every routing bias is random, so
tests can fail on a mistranslated term. And the reference the tests hold greedy decoding to:
`greedy_ids`, a model's own forward over the whole sequence at every step."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
              initializer_range=0.1, tie_word_embeddings=False)

# family -> (config class, model class, config fields beyond COMMON)
FAMILIES = {
    # A window shorter than the test prompts: the compiled windowed mask is exercised too.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                     sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                       decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    # Tiny DeepSeek configs need as many KV heads as query heads.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                         routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=16)),
    # Sparsemixer routing; biased attention, LayerNorms and LM head. A wide jitter_eps keeps
    # several experts in each pick's softmax.
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                    router_jitter_noise=0.2, attention_bias=True, lm_head_bias=True)),
    # Clamped SwiGLU experts with biases (a limit low enough to clamp), attention sinks,
    # alternating sliding and full layers.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     swiglu_limit=0.5)),
    # Routing weights scale the experts' input (top-1); chunked layers (chunks of 4) beside full
    # ones, the full one without rotary embeddings and with temperature tuning; a shared expert.
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(num_key_value_heads=2, head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
                         num_local_experts=8, num_experts_per_tok=1, attention_chunk_size=4,
                         layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0],
                         moe_layers=[0, 1], interleave_moe_layer_step=1)),
    # Short-convolution layers (a state carried between steps, not keys and values) beside
    # attention; sigmoid routing with a selection bias and a scaling factor.
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 dict(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, layer_types=["conv", "full_attention"], num_dense_layers=0,
                      use_expert_bias=True, routed_scaling_factor=1.5)),
    # Granite-4.0-H: a Mamba2 mixer (a convolution state and a scan state, 2 groups, prefill in
    # chunks of 8) beside attention; a shared MLP beside the MoE block.
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(num_key_value_heads=2, intermediate_size=32, shared_intermediate_size=48,
                              num_local_experts=8, num_experts_per_tok=2,
                              layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_head=32,
                              mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=8)),
    # Gated delta net (4 value heads sharing 2 key heads) beside attention; a shared expert with its gate.
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
                        linear_conv_kernel_dim=4)),
    # Qwen3.5's gated delta net has separate q/k/v, z, b, a projections; its rotary sections
    # interleave (an empty slice among them).
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                         dict(num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                              layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)),
    # One block of each kind (Mamba2, MoE, attention, dense MLP); relu^2 experts without a gate;
    # biases on the shared expert (mlp_bias) so the biased plain kind is compiled too.
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(num_hidden_layers=4, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
                        num_key_value_heads=2, head_dim=16, intermediate_size=48, mlp_bias=True,
                        mamba_num_heads=4, mamba_head_dim=32, n_groups=2, ssm_state_size=16, conv_kernel=4,
                        chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=2.5)),
}
MOE_LAYERS = {"nemotron_h": 1}  # family -> its MoE layers where not 2 (one block of each of 4 kinds)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """`overrides`: config fields replacing the defaults above (vocab_size, eos_token_id, ...)."""
    import transformers

    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**COMMON, **fields, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    for name, buffer in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            buffer.normal_(0, 0.5)  # initialised to zero: make the selection bias matter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_bias", ".sinks", "router.bias", "A_log", ".D")):
                # GPT-OSS's expert and router biases and attention sinks start at zero; Mamba2's
                # decay (A_log), skip (D) and time-step bias at one value per head
                param.normal_(0, 0.5)
    return model


def greedy_ids(model: torch.nn.Module, prompt, n: int) -> list[int]:
    """The n greedy tokens after `prompt` (token ids, any shape holding one sequence) by `model`'s
    own forward over the whole sequence at every step, with no KV cache to share bugs with: a
    transformers model (its output's .logits) or the shipped reference model (logits itself)."""
    seq = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    start = seq.shape[1]
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq)
            logits = getattr(logits, "logits", logits)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, start:].tolist()
