"""The kernels over quantized storage (compiler/quant.py's format), as Relax and TE: the fused
dequantize-matmul, the embedding gather, an expert's SwiGLU module (with its fused decode-step
and resident-layer functions), the router module and the resident layer's top-k.

The TE kernels (GPU targets, and shapes without a tile) dequantize one weight at a time inside
the reduction, so no fp32 copy of the weights is ever materialised; on CPU targets the matmuls
are compiler/gemv.py's hand-scheduled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te

from moetvm.artifact import DTYPE_BYTES, SCORE_FNS, fused_function

from . import gemv
from .attention import STACK
from .quant import FLOATS, PLAIN, SWIGLU, SYMMETRIC_ZERO, QuantizationError, Scheme, expert_params, parse_kind, quantize, scale_dtype


def _dequantized(weights: list[te.Tensor], s: Scheme, k, j):
    """The fp32 value of stored weight (k, j), read straight from the stored tensors."""
    f32, t = "float32", s.tile

    def at(tensor, row):
        return tensor[j // t, row, j % t] if t else tensor[row, j]

    w = weights[0]
    if s.name in FLOATS:
        return at(w, k).astype(f32)
    if s.dot:  # input k's byte: row k // interleave, the column's 4 bytes together
        byte = w[j // t, k // s.interleave, (j % t) * 4 + k % 4]
    else:
        byte = at(w, k // 2) if s.name == "int4" else at(w, k)
    if s.name == "int8":
        return byte.astype(f32) * weights[1][j]
    scale, g = weights[1], s.group_size
    shift = (k % 8) // 4 * 4 if s.dot else (k % 2) * 4
    q = (byte >> shift.astype("uint8")) & tvm.tirx.const(15, "uint8")
    zero = tvm.tirx.const(SYMMETRIC_ZERO, f32) if s.symmetric else at(weights[2], k // g).astype(f32)
    return (q.astype(f32) - zero) * at(scale, k // g).astype(f32)


def _matmul_te(x: te.Tensor, weights: list[te.Tensor], s: Scheme, name: str) -> te.Tensor:
    """x (..., K) @ W (K, N) -> (..., N), W dequantized inside the reduction."""
    *lead, k_dim = x.shape
    out_dim = weights[0].shape[0] * s.tile if s.tile else weights[0].shape[1]
    k = te.reduce_axis((0, k_dim), "k")

    def body(*idx):
        *rows, j = idx
        return te.sum(x[(*rows, k)] * _dequantized(weights, s, k, j), axis=k)
    return te.compute((*lead, out_dim), body, name=name)


def gather_te(ids: te.Tensor, weights: list[te.Tensor], s: Scheme, k_dim: int, name: str) -> te.Tensor:
    """Embedding lookup from a table stored as a (K, N) = (d, vocab) weight: out[i, :] is column
    ids[i], dequantized; an out-of-range id is clamped (the runtime checks ids, the kernel
    never reads out of bounds whatever it is given)."""
    vocab = weights[0].shape[0] * s.tile if s.tile else weights[0].shape[1]

    def body(i, k):
        j = te.max(te.min(ids[i].astype("int64"), vocab - 1), 0)
        return _dequantized(weights, s, k, j)
    return te.compute((ids.shape[0], k_dim), body, name=name)


def _stored_dims(weights: list, s: Scheme) -> tuple[int, int]:
    """(K, N) of a weight from its stored tensors."""
    shape = [int(d) for d in weights[0].ty.shape.values]
    if s.tile:
        return shape[1] * s.interleave, shape[0] * s.tile
    return shape[0] * (2 if s.name == "int4" else 1), shape[1]


def matmul_call(bb: relax.BlockBuilder, x: relax.Expr, weights: list, s: Scheme, name: str, cpu: bool) -> relax.Expr:
    """x (..., K) @ the stored weight (K, N) -> (..., N): on CPU targets the hand-scheduled GEMV
    kernel where N allows (compiler/gemv.py), else the TE form for the target's schedules."""
    if not cpu or not s.tile:
        return bb.emit_te(lambda a, *w: _matmul_te(a, list(w), s, name), x, *weights,
                          primfunc_name_hint=f"{name}_{s.tag}_matmul")
    (y,) = stacked_matmul_call(bb, x, weights, s, ())
    return y


def stacked_matmul_call(bb: relax.BlockBuilder, x: relax.Expr, weights: list, s: Scheme,
                        parts: tuple[int, ...]) -> list[relax.Expr]:
    """x (..., K) @ a stacked weight (K, sum(parts)) -> (..., part) for each part, from one call
    of gemv.py's kernel (CPU targets, tiled storage); no parts: one output (..., N)."""
    k_dim, n_dim = _stored_dims(weights, s)
    lead = list(x.ty.shape.values[:-1])
    rows = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, [-1, k_dim]))
    n_rows = rows.ty.shape.values[0]
    widths = parts or (n_dim,)
    kernel = bb.add_func(gemv.matmul(k_dim, n_dim, s, parts),
                         f"{s.tag}_matmul_{k_dim}x" + "_".join(map(str, widths)))
    types = [relax.TensorType((n_rows, n), "float32") for n in widths]
    if parts:
        products = bb.emit(relax.call_tir(kernel, [rows, *weights], types))
        ys = [bb.emit(relax.TupleGetItem(products, j)) for j in range(len(parts))]
    else:
        ys = [bb.emit(relax.call_tir(kernel, [rows, *weights], types[0]))]
    return ys if len(lead) == 1 else [bb.emit(relax.op.reshape(y, [*lead, n])) for y, n in zip(ys, widths)]


@dataclass(frozen=True)
class ResidentRouting:
    """A resident layer function (artifact.MoELayer.resident_function) and the routing it bakes in."""

    function: str
    n_experts: int
    top_k: int
    normalize: bool  # the k weights renormalised to sum to 1
    scaling: float  # then multiplied by this


@dataclass(frozen=True)
class DecodeLayer:
    """A layer's decode function (artifact.MoELayer.decode_function), built into the router
    library beside the layer's router: x (1, 1, d) -> its router's logits -> the kernels of the
    resident function `routing.function` (built there too, as in the workload library), top-k
    scoring the logits -> (1, 1, d)."""

    function: str
    router: str  # the layer's router function
    d_model: int
    d_ff: int
    scheme: Scheme  # the experts' (tiled, fused-resident) storage
    routing: ResidentRouting
    slot: tuple  # (offsets, slot_bytes) of the experts' workload


def top_k_kernel(r: ResidentRouting, cpu: bool = True, score_fn: str | None = None) -> tvm.tirx.PrimFunc:
    """scores (1, E) -> (chosen (k,) int64, weights (1, k) f32): the k best experts in ascending
    expert order (the order the host path sums them in), ties to the lower index as
    moetvm.routing.select_experts breaks them; weights are their scores, renormalised and
    scaled as the router says. Always k distinct experts in [0, E), whatever the scores (NaN
    included): the pool views taken from them stay in bounds. cpu: its scratch on the stack
    (attention.STACK), where "local" scope made five heap workspaces a call (120 allocations and
    frees a GraniteMoE token). `score_fn` ("softmax", "sigmoid"): it takes the router's logits
    and scores them itself, as the router function's softmax (exp(x - max) / sum) or sigmoid
    does: one kernel a decode step's layer fewer."""
    from tvm.script import tirx as T

    if score_fn not in (None, "softmax", "sigmoid"):
        raise QuantizationError(f"top-k cannot score logits by {score_fn!r}")
    scratch = STACK if cpu else "local"
    n, k = r.n_experts, r.top_k
    scaling = float(r.scaling)

    @T.prim_func(private=True, s_tir=True)
    def top_k(scores_h: T.handle, chosen_h: T.handle, weights_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        logits = T.match_buffer(scores_h, (1, n), "float32")  # the scores, where score_fn is None
        chosen = T.match_buffer(chosen_h, (k,), "int64")
        weights = T.match_buffer(weights_h, (1, k), "float32")
        # One opaque block: Relax inspects single-input kernels for a reshape pattern, which
        # needs a block-structured body.
        with T.sblock("top_k"):
            taken = T.decl_buffer((n,), "int32", scope=scratch)
            best = T.decl_buffer((1,), "float32", scope=scratch)
            arg = T.decl_buffer((1,), "int32", scope=scratch)
            count = T.decl_buffer((1,), "int32", scope=scratch)
            total = T.decl_buffer((1,), "float32", scope=scratch)
            probs = T.decl_buffer((n,), "float32", scope=scratch)  # the scores it selects on
            if score_fn == "softmax":
                best[0] = logits[0, 0]
                for e in T.serial(n):
                    best[0] = T.max(best[0], logits[0, e])
                total[0] = T.float32(0)
                for e in T.serial(n):
                    probs[e] = T.exp(logits[0, e] - best[0])
                    total[0] = total[0] + probs[e]
                for e in T.serial(n):
                    probs[e] = probs[e] / total[0]
            elif score_fn == "sigmoid":
                for e in T.serial(n):
                    probs[e] = T.float32(1) / (T.float32(1) + T.exp(T.float32(0) - logits[0, e]))
            else:
                for e in T.serial(n):
                    probs[e] = logits[0, e]
            for e in T.serial(n):
                taken[e] = 0
            for j in T.serial(k):
                arg[0] = -1
                best[0] = T.float32(0)
                for e in T.serial(n):
                    if taken[e] == 0 and (arg[0] < 0 or probs[e] > best[0]):
                        arg[0] = e
                        best[0] = probs[e]
                taken[arg[0]] = 1
            count[0] = 0
            total[0] = T.float32(0)
            for e in T.serial(n):
                if taken[e] == 1:
                    chosen[count[0]] = T.Cast("int64", e)
                    weights[0, count[0]] = probs[e]
                    total[0] = total[0] + probs[e]
                    count[0] = count[0] + 1
            for j in T.serial(k):
                if r.normalize:
                    weights[0, j] = weights[0, j] / total[0] * T.float32(scaling)
                else:
                    weights[0, j] = weights[0, j] * T.float32(scaling)

    return top_k


# A plain expert's activation (quant.ACTIVATIONS names it) as Relax.
PLAIN_ACTIVATIONS = {
    "relu": relax.op.nn.relu,
    "relu2": lambda h: relax.op.square(relax.op.nn.relu(h)),
    "gelu": relax.op.nn.gelu,
    "gelutanh": relax.op.nn.gelu_tanh,
    "silu": relax.op.nn.silu,
}


def expert_module(d_model: int, d_ff: int, s: Scheme, name: str, fused_k: tuple[int, ...] = (),
                  cpu: bool = True, resident: tuple[ResidentRouting, ...] = (),
                  slot: tuple[list[int], int] | None = None, kind: str = SWIGLU) -> tvm.IRModule:
    """An IRModule whose function `name` is the expert kernel:
    (x (n, d_model) f32, *weights) -> (n, d_model) = down(silu(x@gate) * (x@up)),
    and for each k in `fused_k` a function `fused_function(name, k)`:
    (x (n, d_model), gates (n, k), *weights of expert 1, ..., *weights of expert k) ->
    sum_i gates[:, i] * expert_i(x): a decode step's whole MoE layer (one token, its k experts)
    in one call, the weighted sum included; and for each of `resident` its function (x (1, d),
    scores (1, E), pool) -> (1, d) (artifact.MoELayer.resident_function), the experts read
    at the `slot` layout (offsets, slot bytes) of the pool: by gemv.resident_layer, one kernel for
    the whole layer, where the scheme has one (integer-dot CPUs), else through views into the pool
    given to the experts' own GEMVs.
    cpu: the matmuls use compiler/gemv.py's kernels. kind: quant.SWIGLU; a clamped SwiGLU
    (quant.clamped_kind, GPT-OSS): with biases, the gate clamped above at `limit`, the up
    projection to [-limit, limit], and (up + 1) * gate * sigmoid(alpha * gate) between them; or a
    plain MLP (quant.plain_kind, NemotronH): down(act(x @ up + b_up)) + b_down, no gate."""
    specs = expert_params(d_model, d_ff, s, kind)
    clamped, constants = parse_kind(kind)
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")

    def expert(x, params: dict):
        def matmul(a, prefix):
            group = [v for key, v in params.items() if key == prefix or key.startswith(prefix + ".")]
            return matmul_call(bb, a, group, s, prefix, cpu)

        if clamped == SWIGLU:
            gate, up = matmul(x, "w_gate"), matmul(x, "w_up")
            if cpu and gemv.silu_fits(d_ff):
                h = bb.emit(relax.call_tir(bb.add_func(gemv.silu_multiply(d_ff), "silu_multiply"), [gate, up],
                                           relax.TensorType((x.ty.shape.values[0], d_ff), "float32")))
            else:
                h = bb.emit(relax.op.multiply(relax.op.nn.silu(gate), up))
            return matmul(h, "w_down")
        if clamped == PLAIN:
            biased = lambda y, b: relax.op.add(y, params[b]) if constants["biases"] else y  # noqa: E731
            h = bb.emit(PLAIN_ACTIVATIONS[constants["activation"]](biased(matmul(x, "w_up"), "b_up")))
            return bb.emit(biased(matmul(h, "w_down"), "b_down"))
        alpha, limit = (relax.const(np.float32(constants[c])) for c in ("alpha", "limit"))
        gate = relax.op.minimum(relax.op.add(matmul(x, "w_gate"), params["b_gate"]), limit)
        up = relax.op.clip(relax.op.add(matmul(x, "w_up"), params["b_up"]), -constants["limit"], constants["limit"])
        glu = relax.op.multiply(gate, relax.op.sigmoid(relax.op.multiply(gate, alpha)))
        h = bb.emit(relax.op.multiply(relax.op.add(up, relax.const(np.float32(1))), glu))
        return bb.emit(relax.op.add(matmul(h, "w_down"), params["b_down"]))

    def weight_vars(tag: str = "") -> dict:
        return {p: relax.Var(p.replace(".", "_") + tag, relax.TensorType(shape, dtype)) for p, shape, dtype in specs}

    x = relax.Var("x", relax.TensorType((n, d_model), "float32"))
    params = weight_vars()
    with bb.function(name, [x, *params.values()]):
        with bb.dataflow():
            y = bb.emit_output(expert(x, params))
        bb.emit_func_output(y)
    for k in fused_k:
        x = relax.Var("x", relax.TensorType((n, d_model), "float32"))
        gates = relax.Var("gates", relax.TensorType((n, k), "float32"))
        experts = [weight_vars(f"_{i}") for i in range(k)]
        with bb.function(fused_function(name, k), [x, gates, *(v for e in experts for v in e.values())]):
            with bb.dataflow():
                total = None
                for i, params in enumerate(experts):
                    gate = bb.emit(relax.op.strided_slice(gates, axes=[1], begin=[i], end=[i + 1]))
                    term = bb.emit(relax.op.multiply(expert(x, params), gate))
                    total = term if total is None else bb.emit(relax.op.add(total, term))
                out = bb.emit_output(total)
            bb.emit_func_output(out)
    for r in resident:
        if cpu and s.tile and gemv.fuses_resident_layer(s):
            _fused_resident_layer(bb, d_model, d_ff, s, r, specs, slot)
            continue
        # Two functions: the experts take the chosen ids as a shape parameter, so the views'
        # offsets are defined on entry (inside one dataflow block, operator fusion would reorder
        # the views before the ids that place them: it sees only data edges).
        offsets, slot_bytes = slot
        ids = [tvm.tirx.Var(f"expert{i}", "int64") for i in range(r.top_k)]
        x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
        gates = relax.Var("gates", relax.TensorType((1, r.top_k), "float32"))
        pool = relax.Var("pool", relax.TensorType((r.n_experts * slot_bytes,), "uint8"))
        chosen = relax.Var("chosen", relax.ShapeType(ids))
        # Public: Relax's RemoveUnusedParameters fails on a private function whose shape parameter
        # is used only through its symbolic values.
        with bb.function(f"{r.function}_experts", [x, gates, pool, chosen]):
            with bb.dataflow():
                total = None
                for i, e in enumerate(ids):
                    params = {p: bb.emit(relax.op.memory.view(pool, list(shape), dtype,
                                                              relax.prim_value(e * slot_bytes + offset)))
                              for (p, shape, dtype), offset in zip(specs, offsets)}
                    gate = bb.emit(relax.op.strided_slice(gates, axes=[1], begin=[i], end=[i + 1]))
                    term = bb.emit(relax.op.multiply(expert(x, params), gate))
                    total = term if total is None else bb.emit(relax.op.add(total, term))
                out = bb.emit_output(total)
            experts = bb.emit_func_output(out)
        x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
        scores = relax.Var("scores", relax.TensorType((1, r.n_experts), "float32"))
        pool = relax.Var("pool", relax.TensorType((r.n_experts * slot_bytes,), "uint8"))
        with bb.function(r.function, [x, scores, pool]):
            with bb.dataflow():
                kernel = bb.add_func(top_k_kernel(r, cpu), f"top{r.top_k}_of_{r.n_experts}")
                picked = bb.emit(relax.call_tir(kernel, [scores], [relax.TensorType((r.top_k,), "int64"),
                                                                   relax.TensorType((1, r.top_k), "float32")]))
                ids = bb.emit(relax.op.tensor_to_shape(bb.emit(relax.TupleGetItem(picked, 0))))
                out = bb.emit_output(bb.emit(relax.Call(experts, [x, bb.emit(relax.TupleGetItem(picked, 1)), pool, ids])))
            bb.emit_func_output(out)
    return bb.get()


def _fused_resident_layer(bb: relax.BlockBuilder, d_model: int, d_ff: int, s: Scheme, r: ResidentRouting,
                          specs: list, slot: tuple[list[int], int]) -> tvm.ir.GlobalVar:
    """The resident function (x (1, d), scores (1, E), pool) -> (1, d) as two kernels: top-k,
    then the whole layer (gemv.resident_layer) reading the pool and the pool viewed as scales.
    Returns the layer's kernel."""
    offsets, slot_bytes = slot
    layer = bb.add_func(gemv.resident_layer(d_model, d_ff, s, r.n_experts, r.top_k,
                                            {name: offset for (name, _, _), offset in zip(specs, offsets)}, slot_bytes),
                        f"{r.function}_layer")
    x = relax.Var("x", relax.TensorType((1, d_model), "float32"))
    scores = relax.Var("scores", relax.TensorType((1, r.n_experts), "float32"))
    pool = relax.Var("pool", relax.TensorType((r.n_experts * slot_bytes,), "uint8"))
    with bb.function(r.function, [x, scores, pool]):
        with bb.dataflow():
            top_k = bb.add_func(top_k_kernel(r), f"top{r.top_k}_of_{r.n_experts}")
            out = bb.emit_output(_emit_resident_layer(bb, x, scores, pool, d_model, s, r, top_k, layer))
        bb.emit_func_output(out)
    return layer


def _emit_resident_layer(bb: relax.BlockBuilder, x, scores, pool, d_model: int, s: Scheme, r: ResidentRouting,
                         top_k: tvm.ir.GlobalVar, layer: tvm.ir.GlobalVar) -> relax.Expr:
    """The `top_k` kernel on `scores` (or on the logits, for a top-k that scores them), then the
    `layer` kernel, emitted into the current dataflow block: (1, d)."""
    pool_bytes = int(pool.ty.shape.values[0])
    scales = gemv.resident_view_dtype(s)  # the kernel also reads the pool through a view of this dtype
    picked = bb.emit(relax.call_tir(top_k, [scores], [relax.TensorType((r.top_k,), "int64"),
                                                      relax.TensorType((1, r.top_k), "float32")]))
    scales = bb.emit(relax.op.memory.view(pool, [pool_bytes // DTYPE_BYTES[scales]], scales, relax.prim_value(0)))
    return bb.emit(relax.call_tir(layer, [x, bb.emit(relax.TupleGetItem(picked, 1)), bb.emit(relax.TupleGetItem(picked, 0)),
                                          pool, scales], relax.TensorType((1, d_model), "float32")))


def router_module(routers: list[tuple[str, np.ndarray, np.ndarray | None, str]], s: Scheme,
                  cpu: bool = False, decode: tuple[DecodeLayer, ...] = (), base: tvm.IRModule | None = None) -> tvm.IRModule:
    """For each (name, weight (E, d), bias or None, score_fn) a function
    name(x (n, d) f32) -> scores (n, E) = score_fn(x @ W^T + b) (sparsemixer: the logits,
    routing.sparsemixer picks from them), weights baked in as constants at precision `s` (fp32
    by default: routing is the most sensitive part). On CPU targets the logits take the
    hand-scheduled GEMV (gemv.py) where a tile divides E, as the experts' matmuls do (one kernel
    for the routers of a shape): the TE form read GraniteMoE's 128 KB fp32 router in ~13 us a
    token, ~10 GB/s (perf: 2% of an int4 token). `base`: a module to add them to (the segments,
    for a decode step in one call); kernel names are kept apart from its own.

    And each of `decode`'s functions (x (1, 1, d), pool) -> (1, 1, d): a decode step's whole MoE
    layer in one call from the host, where the router and the resident function were two, with
    a view of the hidden state before and of the result after (GraniteMoE int4s, 1 thread: the
    share of decode time outside compiled code, as timed, 6.0-6.7% -> 5.0-5.5%): the router's
    logits, then the resident function's kernels, its top-k scoring the logits (softmax or
    sigmoid) itself."""
    bb = relax.BlockBuilder(base)
    logits_of = {}  # router -> (x -> its logits, emitted where called; its score function)
    for name, weight, bias, score_fn in routers:
        if score_fn not in SCORE_FNS:
            raise QuantizationError(f"unknown router score function {score_fn!r}")
        n = tvm.tirx.Var("n", "int64")
        x = relax.Var("x", relax.TensorType((n, weight.shape[1]), "float32"))
        lanes = gemv.lanes_for(weight.shape[0]) if cpu else None
        stored_as = s.tiled(lanes) if lanes else s
        stored = quantize(np.ascontiguousarray(weight.T), stored_as)
        consts = [relax.const(stored[key]) for key in ("", ".scale", ".zero") if key in stored]
        bias_const = relax.const(np.asarray(bias, np.float32)) if bias is not None else None

        def router_logits(x, name=name, consts=consts, stored_as=stored_as, bias_const=bias_const):
            logits = matmul_call(bb, x, consts, stored_as, f"{name}_logits", cpu)
            return logits if bias_const is None else bb.emit(relax.op.add(logits, bias_const))

        if score_fn != "sparsemixer":
            logits_of[name] = (router_logits, score_fn)
        with bb.function(name, [x]):
            with bb.dataflow():
                logits = router_logits(x)
                if score_fn != "sparsemixer":
                    logits = bb.emit(relax.op.nn.softmax(logits, axis=-1) if score_fn == "softmax"
                                     else relax.op.sigmoid(logits))
                out = bb.emit_output(logits)
            bb.emit_func_output(out)
    # Resident functions and their kernels, one per distinct routing, shared by the layers using
    # it (a kernel is parsed once: ~0.2 s each)
    layers, top_ks = {}, {}
    for layer in decode:
        d, r = layer.d_model, layer.routing
        if r.function not in layers:
            layers[r.function] = _fused_resident_layer(bb, d, layer.d_ff, layer.scheme, r,
                                                       expert_params(d, layer.d_ff, layer.scheme), layer.slot)
        x = relax.Var("x", relax.TensorType((1, 1, d), "float32"))
        pool = relax.Var("pool", relax.TensorType((r.n_experts * layer.slot[1],), "uint8"))
        with bb.function(layer.function, [x, pool]):
            with bb.dataflow():
                row = bb.emit(relax.op.reshape(x, [1, d]))
                if layer.router in logits_of:
                    # the router's logits, scored in the top-k kernel: the softmax's kernel, its
                    # output's allocation and free fewer a layer
                    router_logits, score_fn = logits_of[layer.router]
                    if (r.function, score_fn) not in top_ks:
                        top_ks[r.function, score_fn] = bb.add_func(top_k_kernel(r, score_fn=score_fn),
                                                                   f"top{r.top_k}_of_{r.n_experts}_{score_fn}")
                    out = _emit_resident_layer(bb, row, router_logits(row), pool, d, layer.scheme, r,
                                               top_ks[r.function, score_fn], layers[r.function])
                else:
                    module = bb.get()
                    scores = bb.emit(relax.Call(module.get_global_var(layer.router), [row]))
                    out = bb.emit(relax.Call(module.get_global_var(r.function), [row, scores, pool]))
                y = bb.emit_output(relax.op.reshape(out, [1, 1, d]))
            bb.emit_func_output(y)
    return bb.get()
