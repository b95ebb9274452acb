"""ONNX front door (`compile_onnx`) and per-part ONNX export (`export_parts`).

Import: an ONNX MoE model as `torch.onnx.export(..., dynamo=True)` writes it. Its MoE blocks are
recognised structurally: initializers `<prefix>.router.weight` and
`<prefix>.experts.<e>.{w_gate,w_up,w_down}.weight`, and the nodes the exporter records under the
module scope `<prefix>` (node metadata `pkg.torch.onnx.name_scopes`) are the block. Each block is
read into an `MoELayerSpec` and replaced by an MoE step; the rest of the graph is cut between the
blocks into segment graphs, each imported with TVM's Relax ONNX frontend at the fixed shapes of
the file. The artifact (kind "graph") then runs with the same expert cache as a torch.export one.

Export: every part the runtime runs as its own ONNX file (dense segments, routers, one expert per
workload with its weights as inputs) plus the whole model, each checked in ONNX Runtime against
PyTorch.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import tvm
from tvm import relax
from moetvm.artifact import Step, TensorSpec
from moetvm.targets import DeployTarget, get_target

from . import quant as quantization
from .spec import ExpertWeights, MoELayerSpec, UnsupportedModelError

_ROUTER = re.compile(r"^(?P<prefix>.+)\.router\.weight$")
_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<index>\d+)\.(?P<proj>w_gate|w_up|w_down)\.weight$")
_SCOPES = "pkg.torch.onnx.name_scopes"  # module path of every node, recorded by torch.onnx's dynamo exporter
MARKER_DOMAIN, MARKER_OP = "moetvm", "MoELayer"


class OnnxModelError(UnsupportedModelError):
    """An ONNX file that cannot be read, or whose MoE structure is not understood."""


@dataclass
class _Block:
    """One MoE block of an ONNX graph: the nodes it spans and its one input and one output."""

    layer: int
    input: str
    output: str
    nodes: set[int]
    spec: MoELayerSpec | None = None


@dataclass
class _Part:
    op: str  # "segment" | "moe"
    name: str
    inputs: list[str]
    outputs: list[str]
    layer: int | None = None
    model: onnx.ModelProto | None = field(default=None, repr=False)


# --- reading ---------------------------------------------------------------------------------
def load_onnx(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Read and check an ONNX file, fix its input shapes (`input_shapes` for symbolic dims) and
    infer every intermediate shape (TVM's ONNX importer is reliable only with fixed shapes)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - protobuf and checker errors alike: not a usable ONNX file
        raise OnnxModelError(f"{path}: not a valid ONNX model ({_first_line(e)})") from None
    input_shapes = dict(input_shapes or {})
    initializers = {t.name for t in model.graph.initializer}
    changed = False
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = input_shapes.pop(value.name, None)
        if shape is not None:
            if len(shape) != len(dims):
                raise OnnxModelError(f"{path}: input {value.name} has {len(dims)} dimensions, --input-shape gives {len(shape)}")
            for d, n in zip(dims, shape):
                d.Clear()
                d.dim_value = int(n)
            changed = True
        elif any(not d.HasField("dim_value") for d in dims):
            symbolic = [d.dim_param or "?" for d in dims]
            raise OnnxModelError(f"{path}: input {value.name} has symbolic shape {symbolic}; fix it with "
                                 f"--input-shape {value.name}=" + "x".join(["N"] * len(dims)))
    if input_shapes:
        raise OnnxModelError(f"{path}: --input-shape names unknown inputs {sorted(input_shapes)}")
    if changed:
        del model.graph.value_info[:]  # shapes derived from the old, symbolic inputs
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise OnnxModelError(f"{path}: shape inference failed ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            return ast.literal_eval(prop.value)
    return []


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Initializers and what nodes compute from them alone (the exporter shares such values,
    e.g. one zeros tensor, between blocks): copied into every part that uses them."""
    constants = {t.name for t in graph.initializer}
    for n in graph.node:  # topologically ordered
        if all(t in constants for t in n.input if t):
            constants.update(n.output)
    return constants


def _boundary(graph: onnx.GraphProto, nodes: set[int], constants: set[str], what: str) -> tuple[str, str]:
    """The one activation a set of nodes reads from outside and the one it gives back."""
    produced = {o for i in nodes for o in graph.node[i].output}
    inputs = list(dict.fromkeys(t for i in sorted(nodes) for t in graph.node[i].input
                                if t and t not in produced and t not in constants))
    used_outside = {t for i, n in enumerate(graph.node) if i not in nodes for t in n.input}
    used_outside |= {o.name for o in graph.output}
    outputs = [o for i in sorted(nodes) for o in graph.node[i].output if o in used_outside and o not in constants]
    if len(inputs) != 1 or len(outputs) != 1:
        raise OnnxModelError(f"{what}: expected one input and one output tensor, found inputs {inputs} "
                             f"and outputs {outputs}")
    return inputs[0], outputs[0]


def find_moe_blocks(model: onnx.ModelProto) -> list[_Block]:
    """Every MoE block of a torch.onnx (dynamo) export, in graph order, with its spec."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    routers = {m["prefix"] for name in initializers if (m := _ROUTER.match(name))}
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for name in initializers:
        if m := _EXPERT.match(name):
            experts.setdefault(m["prefix"], {}).setdefault(int(m["index"]), {})[m["proj"]] = name
    for prefix in sorted(set(experts) ^ routers):
        raise OnnxModelError(f"{prefix!r} looks like an MoE block but has "
                             f"{'no router weight' if prefix in experts else 'no experts'}; supported: "
                             f"'<block>.router.weight' with '<block>.experts.<e>.w_gate/w_up/w_down.weight'")
    constants = _constants(graph)
    blocks = []
    for prefix in routers:
        nodes = {i for i, n in enumerate(graph.node) if prefix in _scopes(n)}
        if not nodes:
            raise OnnxModelError(f"MoE block {prefix!r}: no node records its module scope; export the model "
                                 f"with torch.onnx.export(..., dynamo=True), which records scopes")
        x, y = _boundary(graph, nodes, constants, f"MoE block {prefix!r}")
        blocks.append(_Block(layer=-1, input=x, output=y, nodes=nodes,
                             spec=_block_spec(graph, prefix, nodes, initializers, experts[prefix])))
    blocks.sort(key=lambda b: min(b.nodes))
    for i, b in enumerate(blocks):
        b.layer = i
    return blocks


def _block_spec(graph, prefix: str, nodes: set[int], initializers: dict, expert_names: dict) -> MoELayerSpec:
    block_nodes = [graph.node[i] for i in sorted(nodes)]
    consumers = lambda name: [n for n in block_nodes if name in n.input]  # noqa: E731

    def weight(name: str) -> np.ndarray:
        """(out, in) as in torch.nn.Linear, whichever way the graph stores it."""
        w = numpy_helper.to_array(initializers[name]).astype(np.float32)
        uses = consumers(name)
        if len(uses) == 1 and uses[0].op_type == "Gemm" and uses[0].input[1] == name:
            trans_b = next((a.i for a in uses[0].attribute if a.name == "transB"), 0)
            return w if trans_b else w.T.copy()
        if len(uses) == 1 and uses[0].op_type == "MatMul" and uses[0].input[1] == name:
            return w.T.copy()
        if len(uses) == 1 and uses[0].op_type == "Transpose":
            return w
        raise OnnxModelError(f"{name}: used as {[n.op_type for n in uses]}, not as a linear layer's weight")

    router_name = f"{prefix}.router.weight"
    (router_node,) = consumers(router_name) or [None]
    if router_node is None:
        raise OnnxModelError(f"MoE block {prefix!r}: the router weight is not used inside the block")
    bias = None
    if router_node.op_type == "Gemm" and len(router_node.input) > 2 and router_node.input[2]:
        bias = numpy_helper.to_array(initializers[router_node.input[2]]).astype(np.float32)
    scores = [n.op_type for n in consumers(router_node.output[0])]
    if scores not in (["Softmax"], ["Sigmoid"]):
        raise OnnxModelError(f"MoE block {prefix!r}: router scores go to {scores}, expected Softmax or Sigmoid")
    top = [n for n in block_nodes if n.op_type == "TopK"]
    if len(top) != 1 or top[0].input[1] not in initializers:
        raise OnnxModelError(f"MoE block {prefix!r}: expected one TopK with a constant k, found {len(top)}")
    top_k = int(numpy_helper.to_array(initializers[top[0].input[1]]).reshape(-1)[0])
    normalize = any(n.op_type == "ReduceSum" for n in consumers(top[0].output[0]))
    expert_list = []
    for e in range(len(expert_names)):
        names = expert_names.get(e, {})
        if set(names) != {"w_gate", "w_up", "w_down"}:
            raise OnnxModelError(f"MoE block {prefix!r}: expert {e} is missing {sorted({'w_gate', 'w_up', 'w_down'} - set(names))}")
        expert_list.append(ExpertWeights(*(weight(names[p]) for p in ("w_gate", "w_up", "w_down"))))
    spec = MoELayerSpec(path=prefix, router_weight=weight(router_name), top_k=top_k, experts=expert_list,
                        score_fn=scores[0].lower(), normalize=normalize, router_bias=bias)
    if spec.n_experts != len(expert_list) or not 0 < top_k <= spec.n_experts:
        raise OnnxModelError(f"MoE block {prefix!r}: router over {spec.n_experts} experts, {len(expert_list)} "
                             f"expert weights, top-{top_k}")
    return spec


# --- cutting the graph at the MoE blocks -----------------------------------------------------
def cut_at_blocks(model: onnx.ModelProto, blocks: list[_Block]) -> list[_Part]:
    """Segments and MoE steps in run order. Every node outside the blocks runs in the earliest
    segment its inputs allow; a tensor a later part or the graph's output needs is an output of
    the segment that makes it. `model` must carry every intermediate's shape (value_info)."""
    graph = model.graph
    constants = _constants(graph)
    owner = {i for b in blocks for i in b.nodes}
    stage = {t.name: 0 for t in graph.input}
    stage.update({b.output: b.layer + 1 for b in blocks})
    members: list[list[onnx.NodeProto]] = [[] for _ in range(len(blocks) + 1)]
    for i, node in enumerate(graph.node):
        if i in owner or all(o in constants for o in node.output):
            continue
        s = max((stage[t] for t in node.input if t and t not in constants), default=0)
        stage.update({o: s for o in node.output})
        members[s].append(node)
    for b in blocks:
        if stage[b.input] > b.layer:
            raise OnnxModelError(f"MoE layer {b.layer} reads a value computed after a later MoE layer")

    extractor = onnx.utils.Extractor(model)
    parts = []
    for s, nodes in enumerate(members):
        made = [o for n in nodes for o in n.output]
        later_nodes = [n for later in members[s + 1:] for n in later]
        needed = {t for n in later_nodes for t in n.input} | {b.input for b in blocks[s:]} | {o.name for o in graph.output}
        outputs = [o for o in made if o in needed]
        if outputs:
            inputs = list(dict.fromkeys(t for n in nodes for t in n.input if t and t not in constants and t not in made))
            # Nodes no output depends on are dropped by the extraction, and with them some inputs.
            used = {t for n in extractor.extract_model(inputs, outputs).graph.node for t in n.input} | set(outputs)
            inputs = [t for t in inputs if t in used]
            name = f"segment_{sum(p.op == 'segment' for p in parts)}"
            parts.append(_Part("segment", name, inputs, outputs, model=extractor.extract_model(inputs, outputs)))
        if s < len(blocks):
            b = blocks[s]
            parts.append(_Part("moe", f"moe_{b.layer}", [b.input], [b.output], layer=b.layer))
    return parts


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    return TensorSpec(name=value.name, shape=[d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim],
                      dtype=str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))


# --- import ----------------------------------------------------------------------------------
def import_onnx(model: onnx.ModelProto):
    """(MoE layer specs, frontend.SplitProgram) of a shape-inferred ONNX model."""
    from tvm.relax.frontend.onnx import from_onnx

    from .frontend import SplitProgram, _ClampGathers

    blocks = find_moe_blocks(model)
    if not blocks:
        raise OnnxModelError("no MoE block recognised in the ONNX graph (expected initializers "
                             "'<block>.router.weight' and '<block>.experts.<e>.w_gate/w_up/w_down.weight')")
    segments, program = tvm.IRModule(), []
    for part in cut_at_blocks(model, blocks):
        program.append(Step(op=part.op, name=part.name, inputs=part.inputs, outputs=part.outputs, layer=part.layer))
        if part.op != "segment":
            continue
        try:
            func = from_onnx(part.model)["main"]
        except Exception as e:  # noqa: BLE001 - TVM's importer reports unsupported ops in many ways
            raise OnnxModelError(f"{part.name}: TVM's ONNX importer failed ({_first_line(e)})") from None
        func = _ClampGathers(tvm.IRModule({"main": func})).visit_expr(_tuple_result(func))
        segments[part.name] = func.with_attr("global_symbol", part.name)
    initializers = {t.name for t in model.graph.initializer}
    split = SplitProgram(segments=segments, program=program,
                         inputs=[_tensor_spec(v) for v in model.graph.input if v.name not in initializers],
                         outputs=[_tensor_spec(v) for v in model.graph.output])
    return [b.spec for b in blocks], split


def _tuple_result(func: relax.Function) -> relax.Function:
    """Segments always return a tuple (the runtime unpacks one value per named output)."""
    if isinstance(func.body.body.ty, relax.TupleType):
        return func
    body = relax.SeqExpr(func.body.blocks, relax.Tuple([func.body.body]))
    return relax.Function(func.params, body, relax.TupleType([func.body.body.ty]), attrs=func.attrs)


def compile_onnx(path: str | Path, target: str | DeployTarget = "host", out: str | Path = "artifact", *,
                 input_shapes: dict[str, list[int]] | None = None, quant: str = "fp32",
                 group_size: int = quantization.DEFAULT_GROUP_SIZE, router_quant: str = "fp32",
                 routing: str = "learned", tile: int = 16, cycle_dwell: int = 8, tuning_db=None,
                 dense_fallback: bool = False, name: str | None = None, progress: bool = True) -> Path:
    """Compile an ONNX MoE model (fixed shapes; `input_shapes` fixes symbolic input dims) into a
    "graph" artifact. Options as in compile_model; those that need the PyTorch model to run
    calibration text (auto quantization, hash routing, masking) are not available."""
    from .api import Progress, plan_parts, write_artifact

    if quant == "auto" or routing == "hash":
        raise OnnxModelError(f"{'--quant auto' if quant == 'auto' else 'hash routing'} needs calibration through "
                             f"the PyTorch model; not available for an ONNX model")
    dt = target if isinstance(target, DeployTarget) else get_target(target)
    dt.check_toolchain()
    model = load_onnx(path, input_shapes)
    bar = Progress(progress, total=4)  # import, segments, routers, write; plan_parts adds the workloads
    with bar.step(f"cut {Path(path).name} at its MoE blocks, import segments with relax.frontend.onnx"):
        specs, split = import_onnx(model)
    p = plan_parts(specs, split, False, dt, kind="graph", quant=quant, group_size=group_size,
                   router_quant=router_quant, routing=routing, tile=tile, cycle_dwell=cycle_dwell, bar=bar)
    info = {"name": name or Path(path).stem, "description": "", "source": str(path), "format": "onnx",
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "parameters": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
            "moe_layers": len(specs), "experts_per_layer": [s.n_experts for s in specs],
            "top_k": [s.top_k for s in specs]}
    return write_artifact(p, out, info, tuning_db=tuning_db, dense_fallback=dense_fallback, bar=bar)


# --- export: every part as its own ONNX file, checked in ONNX Runtime ------------------------
class RouterScores(nn.Module):
    """The router function the runtime calls: hidden (n, d) -> scores (n, experts), score_fn applied."""

    def __init__(self, spec: MoELayerSpec):
        super().__init__()
        self.score_fn = spec.score_fn
        self.weight = nn.Parameter(torch.from_numpy(spec.router_weight))
        self.bias = None if spec.router_bias is None else nn.Parameter(torch.from_numpy(spec.router_bias))

    def forward(self, x):
        logits = F.linear(x, self.weight, self.bias)
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


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Max absolute error relative to the reference's largest magnitude (as tests/conftest.py)."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def export_parts(model: nn.Module, out: str | Path, tokens_shape: tuple[int, int] = (1, 16), *, seed: int = 0,
                 source: str = "") -> list[dict]:
    """Write the whole model (`model.onnx`, dense-form MoE) and every part the runtime runs as
    ONNX files under `out`: the dense segments between MoE layers, each layer's router and one
    expert per workload (weights as inputs). Each runs in ONNX Runtime on random inputs against
    PyTorch; returns the rows of `parts.json` (part, kind, file, inputs, outputs, max_relative_error)."""
    from .frontend import _with_markers
    from .spec import find_moe_layers

    specs = find_moe_layers(model)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if not specs or vocab is None:
        raise UnsupportedModelError(f"{type(model).__name__}: export-onnx needs an MoE language model "
                                    f"(forward(tokens) -> logits, cfg.vocab_size)")
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

    # The whole model, MoE blocks in their dense export form: what `moetvm compile model.onnx` takes.
    whole = _to_onnx(model, (tokens,), ["tokens"], ["logits"])
    record("model", "model", whole, _relative_error(_ort_run(whole, {"tokens": tokens.numpy()})[0], logits))

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
        errors = [_relative_error(r, known[n]) for n, r in zip(part.outputs, results) if n in known]
        values.update({n: r for n, r in zip(part.outputs, results) if n not in known})
        record(part.name, "segment", part.model, max(errors, default=None))

    n_tokens = int(np.prod(tokens_shape))
    token_dim = torch.export.Dim("tokens", min=1, max=4096)
    for i, spec in enumerate(specs):
        x = torch.from_numpy(rng.standard_normal((n_tokens, spec.d_model)).astype(np.float32))
        router = RouterScores(spec)
        proto = _to_onnx(router, (x,), ["hidden"], ["scores"], dynamic_shapes=({0: token_dim},))
        with torch.no_grad():
            error = _relative_error(_ort_run(proto, {"hidden": x.numpy()})[0], router(x).numpy())
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
        errors = []
        for e in experts:  # one graph, every expert of the workload through it
            with torch.no_grad():
                theirs = ExpertFFN()(x, *weights(e)).numpy()
            feeds = {"x": x.numpy(), "w_gate": e.w_gate, "w_up": e.w_up, "w_down": e.w_down}
            errors.append(_relative_error(_ort_run(proto, feeds)[0], theirs))
        record(f"expert_{kind}_{d_model}x{d_ff}", "expert", proto, max(errors), experts=len(experts))

    index = {"source": source, "tokens_shape": list(tokens_shape), "parts": rows}
    (out / "parts.json").write_text(json.dumps(index, indent=1))
    return rows
