"""torch.export tracing for the PyTorch front door (import_torch.py): trace the model, cut it at its
MoE layers, import the parts to Relax.

The whole model is exported once with every MoE block replaced by an opaque custom op
(`moetvm::moe_layer`), so the dense code between MoE layers is traced exactly as PyTorch runs it.
TVM's exported-program importer turns each marker into an external call; `split_at_moe_layers`
then cuts the Relax function at those calls into segment functions, and records the program
(segment / moe steps with named values) that the runtime interprets. Routers and expert FFNs
are lowered separately from the canonical spec, with expert weights as function parameters so
one kernel serves every expert of a workload (see quant.py).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from moetvm.artifact import KVCacheLayout, Step, TensorSpec, kv_shapes

from .kv_cache import InPlaceLayer, convert_cached_attention
from .layer_state import HOLDERS, convert_delta_rule, convert_short_conv, convert_ssm_scan
from .spec import MoELayerSpec

# torch 2.13 warns about its own pytree internals on every export; it is not actionable here.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

MOE_SYMBOL = "moetvm.moe_layer."
MAX_TOKENS = 4096


@torch.library.custom_op("moetvm::moe_layer", mutates_args=())
def _moe_layer(x: torch.Tensor, layer: int) -> torch.Tensor:
    raise RuntimeError("moetvm::moe_layer only marks an MoE layer for export; it never runs")


@_moe_layer.register_fake
def _(x, layer):
    return torch.empty_like(x)


class _MoEMarker(nn.Module):
    def __init__(self, layer: int, returns_tuple: bool = False):
        super().__init__()
        self.layer, self.returns_tuple = layer, returns_tuple

    def forward(self, x):
        y = torch.ops.moetvm.moe_layer(x, self.layer)
        return (y, None) if self.returns_tuple else y  # (hidden, router scores): the caller drops the scores


def _convert_marker(node, importer):
    x = importer.env[node.args[0]]
    call = relax.call_dps_packed(relax.ExternFunc(f"{MOE_SYMBOL}{node.args[1]}"), [x], out_ty=x.ty)
    return importer.block_builder.emit(call)


def _with_markers(model: nn.Module, specs: list[MoELayerSpec]) -> nn.Module:
    if [s.path for s in specs] == [""]:  # the model is itself one MoE block
        return _MoEMarker(0)
    # A copy of the module tree that shares the tensors: copying the weights would cost the model's size.
    marked = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
    for i, spec in enumerate(specs):
        parent_path, _, attr = spec.path.rpartition(".")
        parent = marked.get_submodule(parent_path) if parent_path else marked
        setattr(parent, attr, _MoEMarker(i, spec.returns_tuple))
    return marked


def _convert_reshape(node, importer):
    """view/reshape without TVM 0.27's identity-reshape shortcut, which compares symbolic dims with
    Python `==` and raises on a symbolic target shape (DeepSeek-V3's attention). An identity
    reshape costs nothing once legalized."""
    import torch

    args = importer.retrieve_args(node)
    dims = args[1] if isinstance(args[1], torch.Size | tuple | list) else args[1:]
    return importer._emit_torch_reshape(args[0], dims)


def _convert_empty(node, importer):
    """`empty(shape)` as zeros, with the shape's symbolic dims resolved (TVM 0.27 passes the raw
    torch.fx arguments through and fails on `new_empty(*x.shape[:-1], n)`, DeepSeek-V3)."""
    import torch

    shape = importer.retrieve_args(node)[0]
    dtype = importer._convert_data_type(node.kwargs.get("dtype", torch.get_default_dtype()), importer.env)
    return importer.block_builder.emit(relax.op.zeros(relax.ShapeExpr(shape), dtype))


def _convert_amax(node, importer):
    """`amax` (from `logsumexp`: attention sinks, e.g. GraniteMoE-SWA), which TVM 0.27 lacks."""
    args = importer.retrieve_args(node)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim", [])
    keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    return importer.block_builder.emit(relax.op.max(args[0], axis=list(dims) or None, keepdims=keepdim))


def _convert_max_dim(node, importer):
    """`max(x, dim)` -> (values, indices) as a reduction and an argmax. TVM imports it as a
    top-1 `topk`, which lowers on CPUs to tvm.contrib.sort.topk, a function of TVM's compiler
    library that a board's runtime library does not have (GPT-OSS's attention sinks: softmax's
    max over scores and sink)."""
    x = importer.env[node.args[0]]
    dim = node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    bb = importer.block_builder
    values = bb.emit(relax.op.max(x, axis=[dim], keepdims=keepdim))
    indices = bb.emit(relax.op.argmax(x, axis=dim, keepdims=keepdim))
    return bb.emit(relax.Tuple([values, indices]))


_CONVERTERS = {"moe_layer.default": _convert_marker, "cached_attention.default": convert_cached_attention,
               "short_conv.default": convert_short_conv, "ssm_scan.default": convert_ssm_scan,
               "delta_rule.default": convert_delta_rule,
               "view.default": _convert_reshape,
               "reshape.default": _convert_reshape, "empty.memory_format": _convert_empty,
               "empty.default": _convert_empty, "amax.default": _convert_amax, "max.dim": _convert_max_dim}


@relax.expr_functor.mutator
class _ClampGathers(relax.PyExprMutator):
    """Embedding lookups import as `take(mode="fast")`, which reads out of bounds on a bad index.
    The runtime validates token ids and positions, but against limits from the manifest; clamp
    in the kernel too, so no manifest can turn a lookup into an out-of-bounds read."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
            return relax.op.take(call.args[0], call.args[1], axis=call.attrs.axis, mode="clip")
        return call


def _lower_complex(ep: torch.export.ExportedProgram) -> None:
    """Rewrite complex-valued arithmetic (rotary embeddings as `polar` / `view_as_complex` /
    complex `mul` / `view_as_real`: DeepSeek-V2, Llama4), which TVM's importer rejects, into real
    arithmetic on (..., 2) tensors holding (real, imaginary), in place."""
    from torch._guards import detect_fake_mode

    aten = torch.ops.aten
    graph = ep.graph_module.graph
    nodes = list(graph.nodes)
    is_complex = lambda n: isinstance(n, torch.fx.Node) and getattr(n.meta.get("val"), "is_complex", lambda: False)()  # noqa: E731
    if not any(is_complex(n) for n in nodes):
        return
    fake_mode = detect_fake_mode([n.meta["val"] for n in nodes if "val" in n.meta])
    real: dict = {}  # complex node -> node of its (..., 2) real form

    def fake(a):
        return [fake(x) for x in a] if isinstance(a, (list, tuple)) else a.meta["val"] if isinstance(a, torch.fx.Node) else a

    def emit(before, target, *args):
        with graph.inserting_before(before):
            node = graph.call_function(target, args)
        with fake_mode:
            node.meta["val"] = target(*fake(args))
        return node

    def parts(at, z):
        pair = real[z]
        return emit(at, aten.select.int, pair, -1, 0), emit(at, aten.select.int, pair, -1, 1)

    for n in nodes:
        if n.op != "call_function" or not (is_complex(n) or any(is_complex(a) for a in n.args)):
            continue
        target, args = n.target, n.args
        if target == aten._assert_tensor_metadata.default:
            graph.erase_node(n)  # a dtype check on the complex tensor, which no longer exists
        elif target == aten.view_as_complex.default:
            real[n] = args[0]
        elif target == aten.view_as_real.default:
            n.replace_all_uses_with(real[args[0]])
        elif target == aten.polar.default:
            magnitude, angle = args
            re = emit(n, aten.mul.Tensor, magnitude, emit(n, aten.cos.default, angle))
            im = emit(n, aten.mul.Tensor, magnitude, emit(n, aten.sin.default, angle))
            real[n] = emit(n, aten.stack.default, [re, im], -1)
        elif target == aten.mul.Tensor and is_complex(args[0]) and is_complex(args[1]):
            (ar, ai), (br, bi) = parts(n, args[0]), parts(n, args[1])
            re = emit(n, aten.sub.Tensor, emit(n, aten.mul.Tensor, ar, br), emit(n, aten.mul.Tensor, ai, bi))
            im = emit(n, aten.add.Tensor, emit(n, aten.mul.Tensor, ar, bi), emit(n, aten.mul.Tensor, ai, br))
            real[n] = emit(n, aten.stack.default, [re, im], -1)
        elif target == aten.mul.Tensor and not isinstance(args[1], torch.fx.Node):
            real[n] = emit(n, aten.mul.Tensor, real[args[0]], args[1])  # complex times a real number
        elif target == aten.unsqueeze.default:
            dim = args[1] - 1 if args[1] < 0 else args[1]  # the (re, im) axis is last
            real[n] = emit(n, aten.unsqueeze.default, real[args[0]], dim)
        elif target in (aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default) \
                and is_complex(n):
            real[n] = real[args[0]]  # same values (complex64 stays complex64 on CPU)
        else:
            raise ValueError(f"complex-valued {target} at {n.name}: no real-arithmetic rewrite for it")
    graph.eliminate_dead_code()
    ep.graph_module.recompile()


def _import(module: nn.Module, args: tuple, dynamic_shapes, keep_params: bool = False) -> tvm.IRModule:
    """The module as Relax `main`. keep_params: its parameters stay inputs of `main` after the
    traced inputs (attrs: `num_input`, `params` their values, `param_names` their PyTorch names),
    for the compiler to store as weight files instead of constants baked into code."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
        ep = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    _lower_complex(ep)
    mod = from_exported_program(ep, keep_params_as_input=keep_params, unwrap_unit_return_tuple=True,
                                custom_convert_map=_CONVERTERS)
    clamp = _ClampGathers(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = clamp.visit_expr(func)
    if keep_params:
        kind = torch.export.graph_signature.InputKind.PARAMETER
        fqn = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs if spec.kind is kind}
        main = mod["main"]
        weights = main.params[int(main.attrs["num_input"]):]
        mod["main"] = main.with_attr("param_names", [fqn[v.name] for v in weights])
    return mod


# --- what the compiler exports for each supported kind of model ------------------------------
class _LMStep(nn.Module):
    """The KV-cached LM protocol (`step`, `kv_layout`) as a module torch.export can trace."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, positions, past_positions, past_keys, past_values):
        return self.lm.step(tokens, positions, past_positions, past_keys, past_values)


class _LMStepWindowed(_LMStep):
    """The concatenating protocol of a model that windows some layers only (kv.full_layers): the
    windowed layers' held positions are an input of their own."""

    def forward(self, tokens, positions, past_positions, window_positions, past_keys, past_values):
        return self.lm.step(tokens, positions, past_positions, past_keys, past_values, window_positions=window_positions)


class _LMStepInPlace(_LMStep):
    """The in-place protocol (compiler/kv_cache.py): per attention layer a key and a value
    buffer the runtime owns, written in place, then per stateful layer its state buffer
    (compiler/layer_state.py); logits out."""

    def forward(self, tokens, positions, past_positions, key_buffers, value_buffers, state_buffers):
        layers = [InPlaceLayer(k, v, past_positions) for k, v in zip(key_buffers, value_buffers)]
        if not state_buffers:
            return self.lm.step(tokens, positions, past_positions, layers, None)[0]
        states = [HOLDERS[spec.kind](buffer, past_positions) for spec, buffer in zip(self.lm.state_layout, state_buffers)]
        return self.lm.step(tokens, positions, past_positions, layers, None, states=states)[0]


def export_causal_lm(model: nn.Module, specs: list[MoELayerSpec], kv: KVCacheLayout = KVCacheLayout()) -> tvm.IRModule:
    """kv.layout: "in_place" (buffers of kv.dtype written in place, see compiler/kv_cache.py) or
    "concat" (past keys and values in, the extended ones out: models with sliding windows)."""
    layers, key_shape, value_shape = kv_shapes(model.kv_layout)
    b, s, p = 2, 3, 2  # example sizes; all three dimensions are exported as symbolic
    batch, seq, past = Dim("batch", min=1, max=64), Dim("seq", min=1, max=MAX_TOKENS), Dim("past", min=0, max=MAX_TOKENS)
    inputs = (torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long), torch.zeros(b, p, dtype=torch.long))
    dyn = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: past})
    if kv.layout == "in_place":
        blocks = Dim("blocks", min=1, max=1 << 14)  # the capacity, in blocks of kv.block positions
        dtype = getattr(torch, kv.dtype)
        key_buffer, value_buffer = kv.buffer_shapes(model.kv_layout, b, 2 * kv.block)
        keys = [torch.zeros(key_buffer, dtype=dtype) for _ in range(layers)]
        values = [torch.zeros(value_buffer, dtype=dtype) for _ in range(layers)]
        states = [torch.zeros(b, *state.shape, dtype=getattr(torch, state.dtype)) for state in kv.states]
        step = _LMStepInPlace(_with_markers(model, specs))
        args = (*inputs, keys, values, states)
        dyn = (*dyn, [{0: batch, 2: blocks}] * layers, [{0: batch, 2: blocks}] * layers, [{0: batch}] * len(states))
    elif kv.full_layers:
        # Windowed layers hold `held` past positions, full ones `past`: two sizes (distinct examples,
        # so export keeps them apart).
        held, w = Dim("window_past", min=0, max=MAX_TOKENS), 3  # >= 2: export specialises sizes 0 and 1
        lengths = [p if i in kv.full_layers else w for i in range(layers)]
        dims = [{0: batch, 2: past if i in kv.full_layers else held} for i in range(layers)]
        past_kv = lambda shape: [torch.zeros(b, shape[0], n, shape[1]) for n in lengths]  # noqa: E731
        step = _LMStepWindowed(_with_markers(model, specs))
        args = (*inputs, torch.zeros(b, w, dtype=torch.long), past_kv(key_shape), past_kv(value_shape))
        dyn = (*dyn, {0: batch, 1: held}, dims, dims)
    else:
        # Distinct tensors: torch.export would treat one object passed twice as one input.
        past_kv = lambda shape: [torch.zeros(b, shape[0], p, shape[1]) for _ in range(layers)]  # noqa: E731
        step = _LMStep(_with_markers(model, specs))
        args, dyn = (*inputs, past_kv(key_shape), past_kv(value_shape)), (*dyn, [{0: batch, 2: past}] * layers, [{0: batch, 2: past}] * layers)
    mod = _import(step, args, dyn, keep_params=True)
    mod["main"] = mod["main"].with_attr("param_names", [weight_name(str(n)) for n in mod["main"].attrs["param_names"]])
    return mod


def weight_name(fqn: str) -> str:
    """A weight's name in the artifact: as in the user's model, without the wrappers' attribute
    names (the step module's `lm`, the transformers wrapper's `hf`)."""
    return fqn.removeprefix("lm.").removeprefix("hf.")


def export_moe_block(model: nn.Module, specs: list[MoELayerSpec], example: torch.Tensor) -> tvm.IRModule:
    dyn = ({i: Dim(f"d{i}", min=1, max=MAX_TOKENS) for i in range(example.dim() - 1)},)
    # torch.export specialises a dimension it sees at size 1; every leading dimension is dynamic
    # anyway, so trace at size >= 2 and a batch-1 example works like any other.
    example = example.new_zeros([max(d, 2) for d in example.shape[:-1]] + [example.shape[-1]])
    return _import(_with_markers(model, specs), (example,), dyn)


# --- cutting the traced model into segments --------------------------------------------------
@dataclass
class SplitProgram:
    segments: tvm.IRModule  # one Relax function per segment
    program: list[Step]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: list[TensorSpec]  # the model's weights, which `main` took after its inputs


def _moe_layer_of(binding) -> int | None:
    value = binding.value
    if isinstance(value, relax.Call) and isinstance(value.args[0] if value.args else None, relax.ExternFunc):
        symbol = value.args[0].global_symbol
        if symbol.startswith(MOE_SYMBOL):
            return int(symbol[len(MOE_SYMBOL):])
    return None


def _free_values(expr, values: set) -> list:
    # free_vars also reports symbolic dims (same Var class in this TVM); those travel inside
    # tensor shapes, so keep only variables that are values of the function.
    return [v for v in relax.analysis.free_vars(expr) if v in values]


def _tensor_spec(name: str, var: relax.Var) -> TensorSpec:
    ty = var.ty
    shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
    return TensorSpec(name=name, shape=shape, dtype=str(ty.dtype))


def split_at_moe_layers(mod: tvm.IRModule, input_names: list[str], output_names: list[str],
                        weight_names: list[str] = ()) -> SplitProgram:
    """Cut `main` at its MoE markers: each run of bindings between markers becomes a segment.
    `main` takes the inputs, then the weights (named by `weight_names`): segments take the
    weights they use as inputs, which the runtime supplies from the artifact's weight files."""
    # Drop trivial `a = b` bindings first, so no segment is a mere rename.
    main = relax.transform.CanonicalizeBindings()(relax.transform.ToNonDataflow()(mod))["main"]
    params = list(main.params)
    body = main.body
    bindings = [b for block in body.blocks for b in block.bindings]

    result = body.body
    if isinstance(result, relax.Var) and bindings and bindings[-1].var.same_as(result) \
            and isinstance(bindings[-1].value, relax.Tuple):
        result = bindings.pop().value  # `gv = (logits, k0, ...)`: return the fields themselves
    values = set(params) | {b.var for b in bindings}
    final_outputs = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    if len(final_outputs) != len(output_names) or not all(isinstance(e, relax.Var) for e in final_outputs):
        raise ValueError(f"expected {len(output_names)} model outputs, the traced graph has {len(final_outputs)}")
    # Name every value that crosses a step boundary; model inputs and outputs keep their names.
    if len(params) != len(input_names) + len(weight_names):
        raise ValueError(f"main takes {len(params)} values, named {len(input_names)} inputs and {len(weight_names)} weights")
    names: dict[relax.Var, str] = {v: n for v, n in zip(params, [*input_names, *weight_names])}
    names.update(zip(final_outputs, output_names))

    def name_of(var):
        return names.setdefault(var, f"v{len(names)}")

    # Cut into pieces: ("segment", [bindings]) and ("moe", layer, binding).
    pieces, current = [], []
    for b in bindings:
        layer = _moe_layer_of(b)
        if layer is None:
            current.append(b)
            continue
        if current:
            pieces.append(("segment", current))
            current = []
        pieces.append(("moe", layer, b))
    if current:
        pieces.append(("segment", current))

    # Values each piece must export: used by a later piece or by the model's outputs.
    needed_later: list[set] = [set() for _ in pieces]
    live = set(final_outputs)
    for i in range(len(pieces) - 1, -1, -1):
        needed_later[i] = set(live)
        piece = pieces[i]
        binds = piece[1] if piece[0] == "segment" else [piece[2]]
        for b in binds:
            live.discard(b.var)
            live |= set(_free_values(b.value, values))

    weight_params = set(params[len(input_names):])
    lm = input_names[:1] == ["tokens"]  # a causal LM step (moe_block artifacts take hidden states)
    segments = tvm.IRModule()
    for gv, func in mod.functions_items():  # kernels the traced code already calls (dense_weights.py)
        if isinstance(func, tvm.tirx.PrimFunc):
            segments[gv] = func
    program: list[Step] = []
    for i, piece in enumerate(pieces):
        if piece[0] == "moe":
            _, layer, b = piece
            (x,) = b.value.args[1].fields
            program.append(Step(op="moe", name=f"moe_{layer}", layer=layer, inputs=[name_of(x)], outputs=[name_of(b.var)]))
            continue
        binds = piece[1]
        defined = [b.var for b in binds]
        used = []
        for b in binds:
            for v in _free_values(b.value, values):
                if v not in defined and v not in used:
                    used.append(v)
        outs = [v for v in defined if v in needed_later[i]]
        fn_name = f"segment_{sum(p.op == 'segment' for p in program)}"
        func, seg_inputs = _segment_function(used, binds, outs, params)
        segments[fn_name] = func.with_attr("global_symbol", fn_name)
        program.append(Step(op="segment", name=fn_name, inputs=[name_of(v) for v in seg_inputs],
                            outputs=[name_of(v) for v in outs],
                            per_position=lm and _per_position(seg_inputs, outs, params[:len(input_names)], weight_params)))

    inputs = [_tensor_spec(n, p) for n, p in zip(input_names, params)]
    weights = [_tensor_spec(n, p) for n, p in zip(weight_names, params[len(input_names):])]
    outputs = [_tensor_spec(n, e) for n, e in zip(output_names, final_outputs)]
    return SplitProgram(segments=segments, program=program, inputs=inputs, outputs=outputs, weights=weights)


def _per_position(seg_inputs: list, outputs: list, model_inputs: list, weights: set) -> bool:
    """Whether a segment computes each position from that position's rows alone: it reads no
    model input (tokens, positions, KV cache, recurrent state) and its other inputs and its
    outputs are (batch, seq, ...) like the tokens. In an LM that decodes step by step, mixing
    positions needs the cache or the positions, so such a segment (the final norm and LM head)
    can be run on the last position alone when only its logits are wanted."""
    if any(v in model_inputs for v in seg_inputs):
        return False
    leading = model_inputs[0].ty.shape.values  # the tokens: (batch, seq)
    if len(leading) != 2:
        return False
    activations = [v for v in seg_inputs if v not in weights] + list(outputs)
    return bool(activations) and all(
        len(v.ty.shape.values) >= 2 and all(tvm_ffi.structural_equal(a, b) for a, b in zip(v.ty.shape.values[:2], leading))
        for v in activations)


def _segment_function(inputs: list, binds: list, outputs: list, model_params: list) -> tuple[relax.Function, list]:
    """A Relax function for one segment; adds model inputs needed only to define symbolic dims
    (e.g. the past length, which later segments see only inside `past + seq`)."""
    params = list(inputs)
    ret_ty = relax.TupleType([v.ty for v in outputs])

    def make(ps):
        body = relax.SeqExpr([relax.BindingBlock(binds)], relax.Tuple(outputs))
        return relax.Function(ps, body, ret_ty)

    func = make(params)
    missing = set(relax.analysis.free_symbolic_vars(func))
    for p in model_params:
        if not missing:
            break
        defines = set(relax.analysis.definable_tir_vars_in_type(p.ty)) & missing
        if defines and p not in params:
            params.append(p)
            missing -= defines
    if missing:
        raise ValueError(f"cannot define symbolic dims {sorted(map(str, missing))} for a segment")
    return relax.utils.copy_with_new_vars(make(params)), params
