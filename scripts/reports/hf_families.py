#!/usr/bin/env python
"""Which Hugging Face transformers MoE families compile and run through moetvm.

For every causal-LM family of the installed transformers whose config mentions experts: a small
random-weight model (2 layers, 8 experts, hidden 64; no model hub), its MoE blocks read by the
adapters, compiled for the host, run with a cache budget that evicts experts, and compared with
transformers' own forward (logits at prompt lengths 1 and 16, greedy generation of 16 tokens).
Prints a markdown table (and writes it to build/hf_families.md): the stage each family reached and,
where it stopped, why.

  .venv/bin/python scripts/reports/hf_families.py [--families mixtral,olmoe,...] [--out build/hf_families.md] [--readme]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import moetvm.compiler  # noqa: F401 - first, before TVM loads (CUDA build set-up)
from moetvm.verify import relative_error

ROOT = Path(__file__).resolve().parents[2]

# Every name a family might use for these sizes; a config keeps unknown names as plain attributes.
TINY = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
    max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
    intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, expert_ffn_hidden_size=32,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_k=2,
    top_k=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, decoder_sparse_step=1, moe_layer_freq=1,
    mlp_only_layers=[], kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    sliding_window=8, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)


def moe_families() -> list[tuple[str, str, str]]:
    """(model_type, config class, causal LM class) for families whose config mentions experts."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, lm_class in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        config_class = CONFIG_MAPPING_NAMES.get(model_type)
        try:
            keys = getattr(transformers, config_class)().to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot even default-construct is not ours to judge
            continue
        if any("expert" in k for k in keys):
            found.append((model_type, config_class, lm_class))
    return found


# Families whose config defaults do not fit TINY's 2 layers: a layer kind per layer, each kind once.
FAMILY_FIELDS = {
    "Lfm2MoeConfig": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "GraniteMoeHybridConfig": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=4,
                                   mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=8),
    # its sizes follow the block list (one of each of its 4 kinds), not num_hidden_layers
    "NemotronHConfig": dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
                            moe_shared_expert_intermediate_size=48, mamba_num_heads=4, mamba_head_dim=32, n_groups=2,
                            ssm_state_size=16, chunk_size=8),
    **{name: dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=16, linear_value_head_dim=16)
       for name in ("Qwen3NextConfig", "Qwen3_5MoeTextConfig")},
}


def tiny_config(config_class):
    """TINY (and FAMILY_FIELDS), less the fields this family's config rejects (it keeps its own
    default for those)."""
    import re

    fields = {**TINY, **FAMILY_FIELDS.get(config_class.__name__, {})}
    for _ in range(len(TINY)):
        try:
            return config_class(**fields)
        except Exception as e:  # noqa: BLE001 - strict configs name the field they refuse
            field = re.search(r"field '(\w+)'", str(e))
            if not field or field.group(1) not in fields:
                raise
            del fields[field.group(1)]
    raise ValueError("no tiny config")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def try_family(model_type: str, config_class: str, lm_class: str, workdir: Path) -> dict:
    import transformers

    from moetvm.compiler import compile_model, find_moe_layers
    from moetvm.compiler.models.hf import HFCausalLM
    from moetvm.runtime import load_model

    row = {"family": model_type, "stage": "config", "why": "", "block": "", "error": None, "greedy": None}
    try:
        torch.manual_seed(0)
        model = getattr(transformers, lm_class)(tiny_config(getattr(transformers, config_class))).eval()
        with torch.no_grad():
            # Some families initialise routers (and selection biases) to constants: every score
            # then ties and top-k order is arbitrary. Trained weights do not tie; random ones don't.
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()) \
                        and tensor.dim() >= 2:
                    tensor.normal_(0, 0.1)
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.normal_(0, 0.5)
        row["stage"] = "wrap"
        wrapped = HFCausalLM(model)
        row["stage"] = "adapter"
        specs = find_moe_layers(wrapped)
        if not specs:
            raise ValueError("no MoE block found with this config")
        row["block"] = type(wrapped.get_submodule(specs[0].path)).__name__
        row["stage"] = "compile"
        t0 = time.perf_counter()
        out = compile_model(wrapped, target="host", out=workdir / model_type, progress=False)
        row["compile_s"] = time.perf_counter() - t0
        row["stage"] = "run"
        runtime = load_model(out, cache_budget="30%")
        rng = np.random.default_rng(0)
        errors = []
        for length in (1, 16):
            tokens = rng.integers(3, 128, size=(1, length))
            with torch.no_grad():
                theirs = model(torch.from_numpy(tokens)).logits.numpy()
            ours = runtime(tokens)
            errors.append(relative_error(ours, theirs))
        row["error"] = max(errors)
        prompt = torch.from_numpy(rng.integers(3, 128, size=(1, 5)))
        seq = prompt
        with torch.no_grad():
            for _ in range(16):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        row["greedy"] = runtime.generate(prompt[0].numpy(), 16) == seq[0, 5:].tolist()
        row["evictions"] = runtime.stats()["evictions"]
        row["stage"] = "ok" if row["error"] < 1e-4 and row["greedy"] else "mismatch"
    except Exception as e:  # noqa: BLE001 - the report records why a family stops, whatever it is
        row["why"] = first_line(e)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=None, help="comma-separated model types (default: every MoE family)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "hf_families.md")
    parser.add_argument("--readme", action="store_true",
                        help=f"also put the table in README.md (between the {README_START} and {README_END} lines)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    families = moe_families()
    if args.families:
        wanted = args.families.split(",")
        families = [f for f in families if f[0] in wanted]
    lines = ["| family | MoE block | reached | logits rel. err | greedy 16 | compile s | why it stops |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, config_class, lm_class in families:
            r = try_family(model_type, config_class, lm_class, Path(tmp))
            err = f"{r['error']:.1e}" if r["error"] is not None else ""
            greedy = {None: "", True: "same", False: "differs"}[r["greedy"]]
            line = (f"| {r['family']} | {r['block']} | {r['stage']} | {err} | {greedy} | "
                    f"{r.get('compile_s', 0):.0f} | {r['why'].replace('|', '/')} |")
            lines.append(line)
            print(line, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.readme:
        put_in_readme(lines, ROOT / "README.md")
        print("README.md: family table replaced", file=sys.stderr)


README_START, README_END = "<!-- hf-families:start -->", "<!-- hf-families:end -->"


def put_in_readme(lines: list[str], readme: Path) -> None:
    """Replace what README.md holds between the markers with the table (the rest is kept)."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {README_START} ... {README_END} section to replace")
    readme.write_text(text[:start + len(README_START)] + "\n" + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    main()
