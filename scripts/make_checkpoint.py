#!/usr/bin/env python3
"""Make a real-shaped random-weight transformers checkpoint directly as safetensors shards.

    scripts/make_checkpoint.py OUT --shape olmoe-1b-7b               # 16 layers x 64 experts, bf16, ~14 GB
    scripts/make_checkpoint.py OUT --shape mixtral-8x7b --layers 2   # 2 of its 32 layers (disk)
    scripts/make_checkpoint.py OUT --shape olmoe-1b-7b --set hidden_size=64 --set num_experts=8 --layers 2

No model is ever held in memory: the model is built on the meta device (shapes only), its
checkpoint keys come from transformers' own reverse conversion (the per-expert keys
`save_pretrained` writes, as real checkpoints on the hub have them), and each tensor is drawn,
written into the current shard and dropped; a shard is written when it reaches --shard-size.
Writes config.json, the shards and model.safetensors.index.json (one model.safetensors when it
fits one shard), in the checkpoint's dtype (bf16 by default, as the published ones are).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The published shapes (config.json of each model on the hub); random weights.
SHAPES = {
    "olmoe-1b-7b": dict(
        cls="OlmoeConfig", hidden_size=2048, num_hidden_layers=16, num_experts=64, intermediate_size=1024,
        num_experts_per_tok=8, vocab_size=50304, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=False, rope_theta=10000.0),
    "mixtral-8x7b": dict(
        cls="MixtralConfig", hidden_size=4096, num_hidden_layers=32, num_local_experts=8, intermediate_size=14336,
        num_experts_per_tok=2, vocab_size=32000, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-5),
    "granite-3.1-1b-a400m": dict(
        cls="GraniteMoeConfig", hidden_size=1024, num_hidden_layers=24, num_local_experts=32, intermediate_size=512,
        num_experts_per_tok=8, vocab_size=49155, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=4096, tie_word_embeddings=True, embedding_multiplier=12.0,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0, rms_norm_eps=1e-6),
    # openai/gpt-oss-20b as transformers saves it (bf16 experts; the hub's files hold them as MXFP4,
    # which this reader does not decode): alternating sliding (128) and full layers, sinks, biases.
    "gpt-oss-20b": dict(
        cls="GptOssConfig", hidden_size=2880, num_hidden_layers=24, num_local_experts=32, intermediate_size=2880,
        num_experts_per_tok=4, vocab_size=201088, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False, swiglu_limit=7.0,
        rms_norm_eps=1e-5),
    # LiquidAI/LFM2-8B-A1B: short-convolution layers (kernel 3) with 6 attention layers among 24,
    # 2 dense layers first, then 32 experts top-4 with a selection bias; tied embeddings.
    "lfm2-8b-a1b": dict(
        cls="Lfm2MoeConfig", hidden_size=2048, num_hidden_layers=24, num_experts=32, moe_intermediate_size=1792,
        intermediate_size=7168, num_dense_layers=2, num_experts_per_tok=4, vocab_size=65536, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=128000, conv_L_cache=3, tie_word_embeddings=True,
        layer_types=["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)]),
    # ibm-granite/granite-4.0-h-tiny: Mamba2 mixers (48 heads of 64, state 128) with 4 attention layers
    # among 40, 64 experts top-6 and a shared MLP in every layer (sizes and layer pattern; its
    # multipliers are left at transformers' defaults).
    "granite-4.0-h-tiny": dict(
        cls="GraniteMoeHybridConfig", hidden_size=1536, num_hidden_layers=40, num_local_experts=64,
        intermediate_size=512, shared_intermediate_size=1024, num_experts_per_tok=6, vocab_size=100352,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=131072, mamba_n_heads=48,
        mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=True,
        layer_types=["full_attention" if i in (5, 15, 25, 35) else "linear_attention" for i in range(40)]),
}
COMMON = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.02)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_config(shape: str, layers: int | None, overrides: list[str]):
    import transformers

    fields = dict(SHAPES[shape])
    cls = getattr(transformers, fields.pop("cls"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        fields[key] = _value(value)
    if layers is not None:
        fields["num_hidden_layers"] = layers
        if isinstance(fields.get("layer_types"), list):
            fields["layer_types"] = fields["layer_types"][:layers]  # (--set layer_types=[...] picks others)
    return cls(**{**COMMON, **fields})


def checkpoint_tensors(config, dtype) -> dict:
    """checkpoint key -> (shape), in transformers' save order, from a model on the meta device."""
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = set((getattr(model, "_tied_weights_keys", None) or {})) if config.tie_word_embeddings else set()
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, help="decoder layers (default: the published count)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. num_experts=128")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shard-size", type=float, default=2.0, help="GB per shard (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out}: exists and is not empty; choose a new directory", file=sys.stderr)
        return 1
    dtype = getattr(torch, DTYPES[args.dtype])
    config = make_config(args.shape, args.layers, args.overrides)
    tensors = checkpoint_tensors(config, dtype)
    total = sum(torch.Size(s).numel() for s in tensors.values()) * torch.empty((), dtype=dtype).element_size()
    args.out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)
    limit = int(args.shard_size * 1e9)
    generator = torch.Generator().manual_seed(args.seed)
    shards: list[dict] = [{}]
    sizes = [0]
    # Plan the shards first: their names carry the count.
    for key, shape in tensors.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = shape
        sizes[-1] += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    started, written = time.perf_counter(), 0
    weight_map = {}
    for name, shard, size in zip(names, shards, sizes):
        data = {}
        for key, shape in shard.items():
            if len(shape) == 1:  # norm scales; biases would be zeros but these families have none
                data[key] = torch.ones(shape, dtype=dtype)
            else:
                data[key] = (torch.randn(shape, generator=generator) * config.initializer_range).to(dtype)
            weight_map[key] = name
        save_file(data, str(args.out / name), metadata={"format": "pt"})
        del data
        written += size
        rate = written / max(time.perf_counter() - started, 1e-9)
        print(f"{name}: {written / 1e9:.2f} / {total / 1e9:.2f} GB, ETA {(total - written) / rate:.0f} s",
              file=sys.stderr, flush=True)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = total // torch.empty((), dtype=dtype).element_size()
    print(f"wrote {args.out}: {args.shape}, {config.num_hidden_layers} layers, {params / 1e9:.2f}B parameters, "
          f"{total / 1e9:.2f} GB {args.dtype} in {len(names)} file(s), {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
