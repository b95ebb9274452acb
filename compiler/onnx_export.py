"""`moetvm export-onnx`: every part the runtime runs as its own ONNX file (dense segments between
MoE layers, routers, one expert per workload with its weights as inputs) plus the whole model,
each run in ONNX Runtime against PyTorch, so a user can check any part outside TVM."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from moetvm.verify import relative_error

from .onnx_frontend import MARKER_DOMAIN, MARKER_OP, _Block, _tensor_spec, cut_at_blocks
from .spec import ExpertWeights, MoELayerSpec, UnsupportedModelError


class RouterScores(nn.Module):
    """The router function the runtime calls: hidden (n, d) -> scores (n, experts), score_fn applied."""

    def __init__(self, spec: MoELayerSpec):
        super().__init__()
        self.score_fn = spec.score_fn
        self.weight = nn.Parameter(torch.from_numpy(spec.router_weight))
        self.bias = None if spec.router_bias is None else nn.Parameter(torch.from_numpy(spec.router_bias))

    def forward(self, x):
        logits = F.linear(x, self.weight, self.bias)
        if self.score_fn == "sparsemixer":  # the runtime picks from the logits
            return logits
        return logits.softmax(-1) if self.score_fn == "softmax" else logits.sigmoid()


class ExpertFFN(nn.Module):
    """One expert workload: the weights are inputs, so one graph serves every expert of a shape."""

    def forward(self, x, w_gate, w_up, w_down):
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _marker_to_onnx(x, layer: int):
    """torch.onnx translation of the `moetvm::moe_layer` marker: a custom-domain node."""
    from onnxscript.values import Opset

    return getattr(Opset(MARKER_DOMAIN, 1), MARKER_OP)(x, layer=layer)


def _register_marker_schema() -> None:
    """The exporter emits only ops with a registered schema."""
    from onnx.defs import OpSchema

    if onnx.defs.has(MARKER_OP, MARKER_DOMAIN):
        return
    onnx.defs.register_schema(OpSchema(
        MARKER_OP, MARKER_DOMAIN, 1, doc="An MoE layer, run by the moetvm runtime (router + cached experts).",
        inputs=[OpSchema.FormalParameter("x", "T")], outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
        attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.INT, "MoE layer index")]))


def _to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], *,
             dynamic_shapes=None, custom_translation_table=None) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torch's deprecation noise; stdout holds the exporter's progress lines
        program = torch.onnx.export(module.eval(), args, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=custom_translation_table,
                                    dynamo=True, verbose=False)
    return onnx.shape_inference.infer_shapes(program.model_proto)


def _ort_session(model: onnx.ModelProto):
    import onnxruntime

    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    return _ort_session(model).run(outputs, feeds)


def export_parts(model: nn.Module, out: str | Path, tokens_shape: tuple[int, int] = (1, 16), *, seed: int = 0,
                 source: str = "") -> list[dict]:
    """Write the whole model (`model.onnx`, dense-form MoE) and every part the runtime runs as
    ONNX files under `out`: the dense segments between MoE layers, each layer's router and one
    expert per workload (weights as inputs). Each runs in ONNX Runtime on random inputs against
    PyTorch; returns the rows of `parts.json` (part, kind, file, inputs, outputs, max_relative_error)."""
    from .frontend import _with_markers
    from .adapters import find_moe_layers

    specs = find_moe_layers(model)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if not specs or vocab is None:
        raise UnsupportedModelError(f"{type(model).__name__}: export-onnx needs an MoE language model "
                                    f"(forward(tokens) -> logits, cfg.vocab_size)")
    states = getattr(model, "state_layout", [])
    if states:  # their ops (compiler/layer_state.py) have TVM kernels, no ONNX translation
        raise UnsupportedModelError(f"{type(getattr(model, 'hf', model)).__name__}: export-onnx does not write "
                                    f"layers that carry a state ({', '.join(sorted({s.kind for s in states}))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, vocab, tokens_shape))
    seen: dict[tuple[str, int], np.ndarray] = {}  # PyTorch's input and output of every MoE layer
    hooks = [model.get_submodule(spec.path).register_forward_hook(
        lambda _m, args, y, i=i: seen.update({("in", i): args[0].numpy(), ("out", i): y.numpy()}))
        for i, spec in enumerate(specs)]
    with torch.no_grad():
        logits = model(tokens).numpy()
    for hook in hooks:
        hook.remove()
    rows = []

    def record(name: str, kind: str, proto: onnx.ModelProto, error: float | None, **extra) -> None:
        file = f"{name}.onnx"
        onnx.save(proto, out / file)
        initializers = {t.name for t in proto.graph.initializer}
        rows.append({"part": name, "kind": kind, "file": file,
                     "inputs": [dataclasses.asdict(_tensor_spec(v)) for v in proto.graph.input if v.name not in initializers],
                     "outputs": [dataclasses.asdict(_tensor_spec(v)) for v in proto.graph.output],
                     "max_relative_error": error, **extra})

    # The whole model, MoE blocks in their export form (a model may offer an `exportable()`
    # context for it, as HFCausalLM does): what `moetvm compile model.onnx` takes.
    with getattr(model, "exportable", contextlib.nullcontext)():
        whole = _to_onnx(model, (tokens,), ["tokens"], ["logits"])
    record("model", "model", whole, relative_error(_ort_run(whole, {"tokens": tokens.numpy()})[0], logits))

    # Dense segments: the model exported with every MoE block as a marker node, cut at the markers.
    _register_marker_schema()
    marked = _to_onnx(_with_markers(model, specs), (tokens,), ["tokens"], ["logits"],
                      custom_translation_table={torch.ops.moetvm.moe_layer.default: _marker_to_onnx})
    blocks = sorted((_Block(layer=n.attribute[0].i, input=n.input[0], output=n.output[0], nodes={i})
                     for i, n in enumerate(marked.graph.node) if n.domain == MARKER_DOMAIN), key=lambda b: b.layer)
    # Each segment runs on PyTorch's values where PyTorch has them (MoE outputs), else on what
    # ONNX Runtime computed in an earlier segment (e.g. a residual), and is judged on the values
    # PyTorch has (the next MoE layer's input, the logits).
    known = {"tokens": tokens.numpy(), "logits": logits}
    known.update({b.input: seen["in", b.layer] for b in blocks} | {b.output: seen["out", b.layer] for b in blocks})
    values = dict(known)
    for part in cut_at_blocks(marked, blocks):
        if part.op != "segment":
            continue
        results = _ort_run(part.model, {n: values[n] for n in part.inputs}, part.outputs)
        errors = [relative_error(r, known[n]) for n, r in zip(part.outputs, results) if n in known]
        values.update({n: r for n, r in zip(part.outputs, results) if n not in known})
        record(part.name, "segment", part.model, max(errors, default=None))

    n_tokens = int(np.prod(tokens_shape))
    token_dim = torch.export.Dim("tokens", min=1, max=4096)
    for i, spec in enumerate(specs):
        x = torch.from_numpy(rng.standard_normal((n_tokens, spec.d_model)).astype(np.float32))
        router = RouterScores(spec)
        proto = _to_onnx(router, (x,), ["hidden"], ["scores"], dynamic_shapes=({0: token_dim},))
        with torch.no_grad():
            error = relative_error(_ort_run(proto, {"hidden": x.numpy()})[0], router(x).numpy())
        record(f"router_{i}", "router", proto, error, layer=i)

    workloads: dict[tuple, list[ExpertWeights]] = {}
    for spec in specs:
        for e in spec.experts + spec.shared:
            if e.kind != "swiglu":
                raise UnsupportedModelError(f"expert kind {e.kind!r}: export-onnx writes SwiGLU experts only")
            workloads.setdefault((e.kind, e.d_model, e.d_ff), []).append(e)
    for (kind, d_model, d_ff), experts in workloads.items():
        x = torch.from_numpy(rng.standard_normal((n_tokens, d_model)).astype(np.float32))
        weights = lambda e: [torch.from_numpy(w) for w in (e.w_gate, e.w_up, e.w_down)]  # noqa: E731
        proto = _to_onnx(ExpertFFN(), (x, *weights(experts[0])), ["x", "w_gate", "w_up", "w_down"], ["y"],
                         dynamic_shapes=({0: token_dim}, None, None, None))
        session, errors = _ort_session(proto), []
        for e in experts:  # one graph, every expert of the workload through it
            with torch.no_grad():
                theirs = ExpertFFN()(x, *weights(e)).numpy()
            feeds = {"x": x.numpy(), "w_gate": e.w_gate, "w_up": e.w_up, "w_down": e.w_down}
            errors.append(relative_error(session.run(None, feeds)[0], theirs))
        record(f"expert_{kind}_{d_model}x{d_ff}", "expert", proto, max(errors), experts=len(experts))

    index = {"source": source, "tokens_shape": list(tokens_shape), "parts": rows}
    (out / "parts.json").write_text(json.dumps(index, indent=1))
    return rows
