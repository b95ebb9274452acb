"""The PyTorch front door: an nn.Module (a causal LM following the KV-cached LM protocol, a
transformers `*ForCausalLM` of a supported family, or one MoE block) -> a PlannedModel, traced
with torch.export and cut into segments at its MoE layers. compiler/onnx_frontend.py is the
other front door; both end in plan.py's plan_parts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moetvm.artifact import KV_QUANTIZED, KVCacheLayout, ModelInfo, kv_shapes, lm_io_names
from moetvm.errors import UsageError

from . import frontend, quant_plan
from .attention import LANES as KV_CAPACITY_MULTIPLE
from .attention import dot_order_fits, key_block
from .dense_weights import store_dense_weights
from .build_target import BuildTarget
from .options import CompileOptions
from .plan import PlannedModel, Progress, plan_parts
from .adapters import find_moe_layers
from .checkpoint import checkpoint_source
from .spec import MoELayerSpec, UnsupportedModelError
from .tokenizer import TokenizerSource


def import_torch(model: nn.Module, example_inputs: tuple, target: BuildTarget, options: CompileOptions, calibration,
                 bar: Progress, *, name: str | None = None, description: str = "", source: str | None = None,
                 tokenizer: str | Path | None = None) -> PlannedModel:
    """Trace `model` (with `example_inputs=(hidden,)` for a lone MoE block), find its MoE layers,
    plan them for `target` with `options` (`calibration`: token windows, see compile_model) and
    cut the rest into segments; the plan carries the manifest's model section and the LM's
    tokenizer (`tokenizer`: a directory with a tokenizer.json, default the model's own)."""
    model = _in_lm_protocol(model)
    if not isinstance(model, nn.Module):
        raise UsageError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    if not _is_causal_lm(model):
        if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor):
            raise UsageError("a single MoE block needs example_inputs=(hidden,) with hidden a torch.Tensor "
                             f"(batch, seq, d_model); got {_describe(example_inputs)}")
    model = model.eval()
    options = options.kept(_precision(model))
    if getattr(model, "streamed", False) and calibration is not None:
        raise UsageError("calibration (--calibration, --quant auto) runs the PyTorch model, whose weights a streamed "
                         "checkpoint leaves on disk: load it with load_model_source(source, stream=False)")
    specs = find_moe_layers(model)
    if not specs:
        raise UnsupportedModelError(f"{type(model).__name__}: no MoE layer found")
    lm = _is_causal_lm(model)
    if not lm and not (len(specs) == 1 and specs[0].path == ""):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected a causal LM with step()/kv_layout or a single MoE block"
        )
    cal = quant_plan.calibrate(model, specs, calibration) if calibration is not None else None
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if options.routing == "hash" and (not lm or vocab is None):
        raise UnsupportedModelError("hash routing needs a language model with a known vocabulary (cfg.vocab_size)")
    p = plan_parts(specs, None, lm, target, options, calibration=calibration, cal=cal, vocab=vocab, bar=bar)
    scheme = options.dense_scheme
    kv = None
    if lm:
        # Sliding-window attention bounds the windowed layers' cache to the window; models mixing
        # windowed and full layers name the full ones, which keep everything.
        window = getattr(model, "window", None)
        states = list(getattr(model, "state_layout", []))
        kv_dtype = options.kv_cache_dtype()
        _, (kv_heads, key_dim), (_, value_dim) = kv_shapes(model.kv_layout)
        block = key_block(model.query_heads, kv_heads)
        # int8 keys and values in the order of the CPU's integer dot products, where it has them
        dot = kv_dtype == "int8" and target.int8_dot and dot_order_fits(key_dim, value_dim, block)
        kv = (KVCacheLayout("in_place", kv_dtype, KV_CAPACITY_MULTIPLE, states=states, block=block, dot=dot)
              if getattr(model, "in_place_kv", False) else
              KVCacheLayout("concat", "float32", window=window, full_layers=list(getattr(model, "full_layers", [])),
                            chunk=getattr(model, "chunk", None) if getattr(model, "full_layers", None) else None))
        if states and kv.layout != "in_place":
            raise UnsupportedModelError(f"{type(getattr(model, 'hf', model)).__name__}: layers that carry a state "
                                        f"({states[0].kind}) need the in-place KV cache, which its attention does not allow")
        if options.kv_dtype in KV_QUANTIZED and kv.layout != "in_place":
            user_class = type(getattr(model, "hf", model)).__name__  # not the wrapper's
            raise UnsupportedModelError(f"--kv-dtype {options.kv_dtype}: {user_class} keeps the concatenating "
                                        f"KV cache (sliding-window, chunked or sink attention), which holds float32")
    kv_note = f", {kv.layout} {kv.dtype} KV cache" \
        + (f" of the last {kv.window - 1} positions" + (f" in {model.kv_layout[0] - len(kv.full_layers)} of "
                                                          f"{model.kv_layout[0]} layers" if kv.full_layers else "")
           if kv.window else "") \
        + (f" of the current {kv.chunk}-position chunk in {model.kv_layout[0] - len(kv.full_layers)} of "
           f"{model.kv_layout[0]} layers" if kv and kv.chunk else "") \
        + (f", {len(kv.states)} layer states ({', '.join(sorted({s.kind for s in kv.states}))})" if kv and kv.states else "") \
        if lm else ""
    with bar.step(f"trace {type(model).__name__} with torch.export ({len(specs)} MoE layers{kv_note})"):
        if lm:
            input_names, output_names = lm_io_names(model.kv_layout[0], kv.layout, len(kv.states), bool(kv.full_layers))
            mod = frontend.export_causal_lm(model, specs, kv)
        else:
            (example,) = example_inputs
            input_names, output_names = ["hidden"], ["output"]
            mod = frontend.export_moe_block(model, specs, example)
    if lm:
        with bar.step(f"store the dense weights ({scheme.tag})"):
            # A streamed model's weights are read from its checkpoint.
            sources = {frontend.weight_name(n): checkpoint_source(t) for n, t in model.named_parameters(remove_duplicate=False)
                       if checkpoint_source(t) is not None}
            mod, p.dense = store_dense_weights(mod, scheme, cpu=target.cpu, sources=sources, vnni=target.int8_dot,
                                               dot=tuple(p for p in ("int8", "int4") if target.dot_for(p)))
    p.cut(frontend.split_at_moe_layers(mod, input_names, output_names, p.dense.names if p.dense else []), bar)
    p.model_info = _model_info(model, name, description, source, specs, kv)
    if tokenizer is not None and not lm:
        raise UsageError("a tokenizer goes with a causal LM; this model is a single MoE block")
    if lm:
        p.tokenizer = (TokenizerSource.from_directory(tokenizer, p.model_info.vocab_size) if tokenizer is not None
                       else getattr(model, "tokenizer_source", None))
        if tokenizer is not None and p.tokenizer is None:
            raise UsageError(f"tokenizer {tokenizer}: no tokenizer.json there")
    return p


def _precision(model: nn.Module) -> str:
    """The precision the weights come in: the checkpoint's for a streamed model, else the
    parameters' (most of them, by count)."""
    if getattr(model, "checkpoint_precision", None):
        return model.checkpoint_precision
    counts: dict = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "kv_layout") and callable(getattr(model, "step", None))


def _in_lm_protocol(model: nn.Module) -> nn.Module:
    """A transformers causal LM (`*ForCausalLM`) is compiled through its LM-protocol wrapper."""
    if not _is_causal_lm(model) and type(model).__module__.startswith("transformers.") \
            and type(model).__name__.endswith("ForCausalLM"):
        from .models.hf import HFCausalLM

        return HFCausalLM(model)
    return model


def _describe(values) -> str:
    return "(" + ", ".join(type(v).__name__ for v in values) + ")" if isinstance(values, tuple) else type(values).__name__


def _model_info(model: nn.Module, name: str | None, description: str, source: str, specs: list[MoELayerSpec],
                kv: KVCacheLayout | None) -> ModelInfo:
    info = dict(name=name or type(getattr(model, "hf", model)).__name__, description=description, source=source,
                parameters=int(sum(p.numel() for p in model.parameters())), moe_layers=len(specs),
                experts_per_layer=[s.n_experts for s in specs], top_k=[s.top_k for s in specs])
    if kv is not None:
        cfg = getattr(model, "cfg", None)
        info.update({key: getattr(cfg, key) for key in ("vocab_size", "max_positions", "d_model") if hasattr(cfg, key)})
        info.update(kv_layout=list(model.kv_layout), kv_cache=kv)
    return ModelInfo(**info)
