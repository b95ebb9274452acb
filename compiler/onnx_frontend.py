"""The ONNX front door: `import_onnx` reads a file into a PlannedModel (api.compile_onnx builds it;
per-part export to ONNX is onnx_export.py).

Import: an ONNX MoE model as `torch.onnx.export(..., dynamo=True)` writes it, of the reference
model or a transformers family (Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3 and their copies). MoE
blocks are recognised from the module scopes the exporter records on every node (metadata
`pkg.torch.onnx.name_scopes`): a module `<prefix>` with an `experts` child and a `router`/`gate`
child is a block, and all nodes under `<prefix>` are its graph. Its parts are read by their scopes,
not by initializer names (the exporter's optimiser folds and renames parameters): router and
shared-expert Linears, experts as per-expert Linears (`experts.<e>.w_gate`, ...) or as the fused 3-D
tensors transformers keeps (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), gathered per token
in the captured form). Top-k, score function, renormalisation, routed scaling, selection bias and
grouped choice are read from the block's ops. Each block becomes an MoELayerSpec and an MoE step
(the captured expert computation is dropped); the rest of the graph is cut between the blocks into
segment graphs, each imported with TVM's Relax ONNX frontend at the fixed shapes of the file. The
artifact (kind "graph") then runs with the same expert cache as a torch.export one.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
from onnx import numpy_helper

import tvm
from tvm import relax
from moetvm.artifact import ModelInfo, Step, TensorSpec

from .build_target import BuildTarget
from .options import CompileOptions
from .plan import PlannedModel, Progress, plan_parts
from .spec import ExpertWeights, MoELayerSpec, UnsupportedModelError, experts_from_fused

# Module names inside an MoE block, as the exporter's scopes record them: the reference model's
# and transformers' alike.
_ROUTERS = ("router", "gate")
_SHARED = ("shared_expert", "shared_experts")  # gate_proj/up_proj/down_proj MLPs
_SHARED_GATES = ("shared_expert_gate",)  # Linear(hidden, 1) whose sigmoid scales the shared expert
_PROJECTIONS = (("w_gate", "w_up", "w_down"), ("gate_proj", "up_proj", "down_proj"))  # per-expert Linears
_EXPERTS_SCOPE = re.compile(r"^(?P<prefix>.+)\.experts(\.\d+)?$")
_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+)\.experts\.\d+\.\w+\.weight$")
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity"}
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


class _GraphIndex:
    """Producers, consumers, constants and module scopes of a graph's nodes."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = _constants(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        self.scoped: dict[str, list[int]] = {}  # module scope -> nodes recorded under it (or below)
        for i, n in enumerate(graph.node):
            for t in n.input:
                self._consumers.setdefault(t, []).append(n)
            for s in _scopes(n):
                self.scoped.setdefault(s, []).append(i)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return self._consumers.get(name, [])

    def array(self, name: str) -> np.ndarray | None:
        """An initializer's value (None for anything else)."""
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def scalar(self, name: str) -> float | None:
        value = self.array(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def forward(self, name: str) -> str:
        """Follow a tensor through the value-preserving ops the exporter puts around everything."""
        while len(users := self.consumers(name)) == 1 and users[0].op_type in _PASS_THROUGH and users[0].input[0] == name:
            name = users[0].output[0]
        return name

    def source(self, name: str) -> str:
        """The tensor `name` is a reshaped or cast copy of."""
        while (n := self.producer.get(name)) is not None and n.op_type in _PASS_THROUGH:
            name = n.input[0]
        return name


def find_moe_blocks(model: onnx.ModelProto) -> list[_Block]:
    """Every MoE block of a torch.onnx (dynamo) export, in graph order, with its spec.

    A block is the module scope `<prefix>` that holds an `experts` scope and a router scope
    (`router` or `gate`); its parts are read from the nodes recorded under their scopes (the
    exporter's optimiser renames and folds initializers, so names alone do not find them)."""
    graph = model.graph
    ix = _GraphIndex(graph)
    prefixes = {m["prefix"] for s in ix.scoped if (m := _EXPERTS_SCOPE.match(s))}
    named = {m["prefix"] for name in ix.initializers if (m := _EXPERT_WEIGHT.match(name))}
    for prefix in sorted(named - prefixes):  # names of an MoE block but no scopes: not a dynamo export
        if not any(f"{prefix}.{r}.weight" in ix.initializers for r in _ROUTERS):
            raise OnnxModelError(f"{prefix!r} looks like an MoE block but has no router weight; supported: "
                                 f"'<block>.router.weight' with '<block>.experts.<e>.w_gate/w_up/w_down.weight'")
        raise OnnxModelError(f"MoE block {prefix!r}: no node records its module scope; export the model "
                             f"with torch.onnx.export(..., dynamo=True), which records scopes")
    blocks = []
    for prefix in prefixes:
        if not any(f"{prefix}.{r}" in ix.scoped for r in _ROUTERS):
            raise OnnxModelError(f"{prefix!r} looks like an MoE block (it has experts) but has no router "
                                 f"module ({' or '.join(_ROUTERS)}) recorded in its scope")
        nodes = _absorb_unscoped(graph, set(ix.scoped[prefix]), ix.constants)
        x, y = _boundary(graph, nodes, ix.constants, f"MoE block {prefix!r}")
        blocks.append(_Block(layer=-1, input=x, output=y, nodes=nodes, spec=_block_spec(ix, prefix, nodes)))
    blocks.sort(key=lambda b: min(b.nodes))
    for i, b in enumerate(blocks):
        b.layer = i
    return blocks


def _absorb_unscoped(graph: onnx.GraphProto, nodes: set[int], constants: set[str]) -> set[int]:
    """Nodes the exporter's optimiser makes (e.g. the Split of a `chunk`) carry no scope; one fed
    only by the block belongs to it."""
    produced = {o for i in nodes for o in graph.node[i].output}
    for i, n in enumerate(graph.node):  # topological order: a chain of them joins in one pass
        if i in nodes or _scopes(n):
            continue
        inputs = [t for t in n.input if t and t not in constants]
        if inputs and all(t in produced for t in inputs):
            nodes.add(i)
            produced.update(n.output)
    return nodes


def _linear(ix: _GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight (out, in) as in torch.nn.Linear, bias) of a Gemm/MatMul with a constant weight."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
        return None
    name, transposed = node.input[1], node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    if (t := ix.producer.get(name)) is not None and t.op_type == "Transpose":  # an unfolded W.T
        name, transposed = t.input[0], not transposed
    w = ix.array(name)
    if w is None or w.ndim != 2 or (node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)):
        return None
    bias = ix.array(node.input[2]) if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    if bias is None:  # MatMul + Add of a constant vector
        users = ix.consumers(node.output[0])
        if len(users) == 1 and users[0].op_type == "Add":
            other = ix.array(next(t for t in users[0].input if t != node.output[0]))
            bias = other if other is not None and other.ndim == 1 else None
    w = w.astype(np.float32)
    return (w if transposed else w.T.copy()), (None if bias is None else bias.astype(np.float32))


def _one_linear(ix: _GraphIndex, scope: str, what: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray | None]:
    found = [(n, *lin) for i in ix.scoped.get(scope, []) if (lin := _linear(ix, n := ix.graph.node[i]))]
    if len(found) != 1:
        raise OnnxModelError(f"{what}: expected one linear layer with a constant weight under {scope!r}, found {len(found)}")
    return found[0]


def _check_swiglu(ix: _GraphIndex, gate: str, up: str, down_input: str, what: str) -> None:
    """down(silu(gate) * up): SiLU as the exporter writes it, x * Sigmoid(x)."""
    sig = [n.output[0] for n in ix.consumers(gate) if n.op_type == "Sigmoid"]
    silu = [n.output[0] for n in ix.consumers(gate) if n.op_type == "Mul" and set(n.input) & set(sig)]
    product = [n.output[0] for s in silu for n in ix.consumers(s) if n.op_type == "Mul" and up in n.input]
    if product != [ix.source(down_input)]:
        raise OnnxModelError(f"{what}: not a SwiGLU FFN (down(silu(gate) * up)); other activations are not supported")


def _mlp(ix: _GraphIndex, scope: str, names: tuple[str, str, str], what: str) -> ExpertWeights:
    """A gated MLP of three bias-free linear layers named `names` under `scope`."""
    parts = [_one_linear(ix, f"{scope}.{p}", what) for p in names]
    if any(bias is not None for _, _, bias in parts):
        raise OnnxModelError(f"{what}: an expert projection has a bias (the expert kernels have none)")
    (gate, w_gate, _), (up, w_up, _), (down, w_down, _) = parts
    _check_swiglu(ix, gate.output[0], up.output[0], down.input[0], what)
    return ExpertWeights(w_gate, w_up, w_down)


def _fused_experts(ix: _GraphIndex, scope: str, n_experts: int, what: str) -> list[ExpertWeights]:
    """Experts stored as two 3-D tensors (transformers' gate_up_proj and down_proj), each row of
    which the captured graph gathers per token: the first gathered is gate_up, the second down."""
    gathered = []
    for i in ix.scoped.get(scope, []):
        n = ix.graph.node[i]
        w = ix.array(n.input[0]) if n.op_type in ("Gather", "GatherND") else None
        if w is None or w.ndim != 3:
            continue
        (mm,) = [u for u in ix.consumers(n.output[0]) if u.op_type == "MatMul"] or [None]
        if mm is None:
            raise OnnxModelError(f"{what}: gathered expert weights {n.input[0]!r} do not feed a matrix product")
        # bmm(weight, x) stores (E, out, in) as PyTorch; bmm(x, weight) stores (E, in, out).
        first = mm.input[0] == n.output[0]
        gathered.append((w if first else w.transpose(0, 2, 1), mm, mm.input[1 if first else 0]))
    if len(gathered) != 2:
        raise OnnxModelError(f"{what}: expected two gathered 3-D expert tensors (gate_up, down) under "
                             f"{scope!r}, found {len(gathered)}")
    (gate_up, up_mm, _), (down, _, down_input) = gathered
    if gate_up.shape[0] != n_experts:
        raise OnnxModelError(f"{what}: expert tensors {gate_up.shape} hold {gate_up.shape[0]} experts, the router "
                             f"scores {n_experts}")
    # The default gate function chunks gate_up's output in two: gate rows first, then up rows.
    (split,) = [u for u in ix.consumers(ix.forward(up_mm.output[0])) if u.op_type == "Split"] or [None]
    sizes = ix.array(split.input[1]) if split is not None and len(split.input) > 1 and split.input[1] else None
    if split is None or len(split.output) != 2 or (sizes is None and len(split.input) > 1 and split.input[1]) \
            or (sizes is not None and sizes[0] != sizes[1]):
        raise OnnxModelError(f"{what}: the gate_up product is not split into equal gate and up halves")
    _check_swiglu(ix, split.output[0], split.output[1], down_input, what)
    try:
        return experts_from_fused(gate_up.astype(np.float32), down.astype(np.float32))
    except UnsupportedModelError as e:
        raise OnnxModelError(f"{what}: {e}") from None


def _routing_weights(ix: _GraphIndex, values: str, nodes: set[int]) -> tuple[bool, float]:
    """(renormalised, routed scaling) of the top-k scores on their way to weighting the experts:
    a Div by their ReduceSum, a Mul by a constant."""
    inside = {o for i in nodes for o in ix.graph.node[i].output}
    normalize, scaling = False, 1.0
    while True:
        values = ix.forward(values)
        users = [n for n in ix.consumers(values) if n.output[0] in inside]
        ops = sorted(n.op_type for n in users)
        div, total = (next((n for n in users if n.op_type == op), None) for op in ("Div", "ReduceSum"))
        if ops == ["Div", "ReduceSum"] and list(div.input) == [values, total.output[0]]:
            normalize, values = True, div.output[0]
        elif ops == ["Mul"] and (c := next((ix.scalar(t) for t in users[0].input if t != values), None)) is not None:
            scaling, values = scaling * c, users[0].output[0]
        else:
            return normalize, scaling


def _routing(ix: _GraphIndex, scores_node: onnx.NodeProto, nodes: set[int], n_experts: int, what: str) -> dict:
    """MoELayerSpec's routing fields, read from the block's ops: the last TopK picks the experts
    (its k is top_k) from the scores, plus a constant selection bias (Add) and, before it, the
    group choice (DeepSeek-V3: TopK 2 per group, ReduceSum, TopK of the groups, Where-masking)."""
    scores = ix.forward(scores_node.output[0])
    tops = [ix.graph.node[i] for i in sorted(nodes) if ix.graph.node[i].op_type == "TopK"]
    if not tops or any(ix.scalar(t.input[1]) is None for t in tops):
        raise OnnxModelError(f"{what}: expected a TopK with a constant k, found {len(tops)} TopK nodes")
    final, k = tops[-1], lambda top: int(ix.scalar(top.input[1]))  # noqa: E731
    picked_from = ix.source(final.input[0])
    grouped = ix.producer.get(picked_from)
    n_groups, top_groups = 1, 1
    if grouped is not None and grouped.op_type == "Where":  # experts outside the chosen groups masked out
        picked_from = ix.source(grouped.input[2])
        if len(tops) != 3:
            raise OnnxModelError(f"{what}: masked expert choice without the group TopKs it needs ({len(tops)} TopK)")
        per_group, of_groups = tops[0], tops[1]
        reshape = ix.producer.get(per_group.input[0])  # (tokens, experts) -> (tokens, groups, experts per group)
        shape = ix.array(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
        sums = [n.output[0] for n in ix.consumers(per_group.output[0]) if n.op_type == "ReduceSum"]
        if (shape is None or ix.source(per_group.input[0]) != picked_from or k(per_group) != 2
                or [ix.forward(t) for t in sums] != [of_groups.input[0]] or shape[-2] * shape[-1] != n_experts):
            raise OnnxModelError(f"{what}: grouped expert choice is not a top-2-sum group rank over reshaped scores")
        n_groups, top_groups = int(shape[-2]), k(of_groups)
    elif len(tops) != 1:
        raise OnnxModelError(f"{what}: {len(tops)} TopK nodes but no grouped choice this importer understands")
    selection_bias = None
    if picked_from != scores:
        add = ix.producer.get(picked_from)
        bias = None if add is None or add.op_type != "Add" else ix.array(next((t for t in add.input if t != scores), ""))
        if bias is None or scores not in add.input or bias.shape != (n_experts,):
            raise OnnxModelError(f"{what}: TopK does not select from the router's scores (or scores plus a bias)")
        selection_bias = bias.astype(np.float32)
    # The weights: the top-k values, or (with a selection bias) the unbiased scores gathered at the picks.
    gathered = [n for n in ix.consumers(final.output[1]) if n.op_type == "GatherElements" and ix.source(n.input[0]) == scores]
    if selection_bias is not None and len(gathered) != 1:
        raise OnnxModelError(f"{what}: with a selection bias, expected the weights gathered from the unbiased scores")
    normalize, scaling = _routing_weights(ix, gathered[0].output[0] if gathered else final.output[0], nodes)
    return dict(top_k=k(final), score_fn=scores_node.op_type.lower(), normalize=normalize, scaling=scaling,
                selection_bias=selection_bias, n_groups=n_groups, top_groups=top_groups)


def _block_spec(ix: _GraphIndex, prefix: str, nodes: set[int]) -> MoELayerSpec:
    what = f"MoE block {prefix!r}"
    router = next(f"{prefix}.{r}" for r in _ROUTERS if f"{prefix}.{r}" in ix.scoped)
    router_node, router_weight, router_bias = _one_linear(ix, router, what)
    logits = router_node.output[0]
    if router_bias is not None and router_node.op_type == "MatMul":
        logits = ix.consumers(logits)[0].output[0]  # after the bias Add
    scores = [n for n in ix.consumers(ix.forward(logits)) if n.op_type in ("Softmax", "Sigmoid")]
    if len(scores) != 1:
        raise OnnxModelError(f"{what}: router logits go to {[n.op_type for n in ix.consumers(logits)]}, "
                             f"expected Softmax or Sigmoid")
    n_experts = router_weight.shape[0]
    routing = _routing(ix, scores[0], nodes, n_experts, what)

    per_expert: dict[int, set[str]] = {}  # per-expert Linears: index -> projection names
    for s in ix.scoped:
        if (m := re.match(re.escape(prefix) + r"\.experts\.(\d+)\.(\w+)$", s)):
            per_expert.setdefault(int(m[1]), set()).add(m[2])
    if per_expert:
        names = next((p for p in _PROJECTIONS if set(p) == per_expert[0]), None)
        if names is None or sorted(per_expert) != list(range(n_experts)) or any(v != per_expert[0] for v in per_expert.values()):
            raise OnnxModelError(f"{what}: expert modules {sorted(per_expert)} with projections {sorted(per_expert[0])}; "
                                 f"expected {n_experts} experts with one of {[list(p) for p in _PROJECTIONS]}")
        experts = [_mlp(ix, f"{prefix}.experts.{e}", names, f"{what} expert {e}") for e in range(n_experts)]
    else:
        experts = _fused_experts(ix, f"{prefix}.experts", n_experts, what)

    shared, shared_gate = [], None
    for name in _SHARED:
        if f"{prefix}.{name}" in ix.scoped:
            shared.append(_mlp(ix, f"{prefix}.{name}", _PROJECTIONS[1], f"{what} {name}"))
    for name in _SHARED_GATES:
        if f"{prefix}.{name}" in ix.scoped:
            gate_node, shared_gate, bias = _one_linear(ix, f"{prefix}.{name}", what)
            if bias is not None or shared_gate.shape[0] != 1 or [n.op_type for n in ix.consumers(gate_node.output[0])] != ["Sigmoid"]:
                raise OnnxModelError(f"{what}: {name} is not a bias-free Linear(hidden, 1) under a Sigmoid")
    spec = MoELayerSpec(path=prefix, router_weight=router_weight, experts=experts, router_bias=router_bias,
                        shared=shared, shared_gate_weight=shared_gate, **routing)
    if not 0 < spec.top_k <= n_experts or any(e.d_model != spec.d_model for e in experts + shared):
        raise OnnxModelError(f"{what}: router over {n_experts} experts of width {spec.d_model}, top-{spec.top_k}, "
                             f"expert widths {sorted({e.d_model for e in experts + shared})}")
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
            segment = extractor.extract_model(inputs, outputs)
            # Nodes no output depends on are dropped by the extraction, and with them some inputs.
            used = {t for n in segment.graph.node for t in n.input} | set(outputs)
            kept = [v for v in segment.graph.input if v.name in used]
            del segment.graph.input[:]
            segment.graph.input.extend(kept)
            name = f"segment_{sum(p.op == 'segment' for p in parts)}"
            parts.append(_Part("segment", name, [v.name for v in kept], outputs, model=segment))
        if s < len(blocks):
            b = blocks[s]
            parts.append(_Part("moe", f"moe_{b.layer}", [b.input], [b.output], layer=b.layer))
    return parts


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    return TensorSpec(name=value.name, shape=[d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim],
                      dtype=str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))


# --- import ----------------------------------------------------------------------------------
def import_onnx(path: str | Path, target: BuildTarget, options: CompileOptions, bar: Progress, *,
                input_shapes: dict[str, list[int]] | None = None, name: str | None = None) -> PlannedModel:
    """The ONNX front door: the model at `path` (fixed shapes; `input_shapes` fixes symbolic input
    dims) cut at its MoE blocks, segments imported with relax.frontend.onnx, the blocks planned
    for `target` with `options`; the plan carries the manifest's model section (kind "graph").
    Options that run calibration tokens through the PyTorch model (auto quantization, hash
    routing, masking) or shape an LM's dense part and KV cache are refused."""
    refused = [flag for flag, given in (("--quant auto", options.quant == "auto"), ("hash routing", options.routing == "hash"),
                                         ("--mask-below", options.mask_below is not None),
                                         ("--dense-quant", options.dense_quant is not None),
                                         ("--kv-dtype", options.kv_dtype is not None)) if given]
    if refused:
        raise OnnxModelError(f"{', '.join(refused)}: not available for an ONNX model (calibration runs the PyTorch "
                             f"model; an ONNX graph keeps its dense part as imported)")
    model = load_onnx(path, input_shapes)
    if options.quant == "keep":  # the initializers' precision, for the experts (the dense part stays as imported)
        sizes: dict = {}
        for t in model.graph.initializer:
            sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
        stored = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(max(sizes, key=sizes.get, default=0), "fp32")
        options = dataclasses.replace(options, quant=options.kept(stored).quant)
    with bar.step(f"cut {Path(path).name} at its MoE blocks, import segments with relax.frontend.onnx"):
        specs, split = cut_onnx(model)
    p = plan_parts(specs, split, False, target, options, kind="graph", bar=bar)
    p.model_info = ModelInfo(name=name or Path(path).stem, source=str(path), format="onnx",
                             opset={o.domain or "ai.onnx": o.version for o in model.opset_import},
                             parameters=int(sum(np.prod(t.dims) for t in model.graph.initializer)),
                             moe_layers=len(specs), experts_per_layer=[s.n_experts for s in specs],
                             top_k=[s.top_k for s in specs], index_limits=_index_limits(model))
    return p


def cut_onnx(model: onnx.ModelProto):
    """(MoE layer specs, frontend.SplitProgram) of a shape-inferred ONNX model."""
    from tvm.relax.frontend.onnx import from_onnx

    from .frontend import SplitProgram, _ClampGathers

    blocks = find_moe_blocks(model)
    if not blocks:
        raise OnnxModelError("no MoE block recognised in the ONNX graph (expected a module with 'experts' and "
                             "a 'router' or 'gate' in the node scopes of a torch.onnx.export(..., dynamo=True) file)")
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
                         outputs=[_tensor_spec(v) for v in model.graph.output],
                         weights=[])  # ONNX initializers stay constants of the segments (issue 15)
    return [b.spec for b in blocks], split


def _tuple_result(func: relax.Function) -> relax.Function:
    """Segments always return a tuple (the runtime unpacks one value per named output)."""
    if isinstance(func.body.body.ty, relax.TupleType):
        return func
    body = relax.SeqExpr(func.body.blocks, relax.Tuple([func.body.body]))
    return relax.Function(func.params, body, relax.TupleType([func.body.body.ty]), attrs=func.attrs)


def _index_limits(model) -> dict[str, int]:
    """Graph inputs used as indices into a constant table (token ids into an embedding) -> the
    table's size along that axis: the runtime refuses ids outside it instead of the kernel
    clamping them into a quietly wrong answer."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    limits: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            size = int(dims[axis if axis >= 0 else axis + len(dims)])
            limits[node.input[1]] = min(size, limits.get(node.input[1], size))
    return limits
