"""A decode step in one call (artifact format 13), as MLC-LLM's `decode` function is: one Relax
function of the segments library runs the whole program for one token, every segment and every
MoE layer's decode function (router, top-k and the resident layer), so the host makes one call a
token where it made one per segment and per layer. The KV cache is written in place and the
hidden state never leaves the function; the host passes the step's inputs, the dense weights and
each layer's expert pool, and gets the logits.

The functions are inlined, not called (a call checks every argument's type and shape again: 34 of
a GraniteMoE segment's 176 VM instructions), the batch and sequence are 1 (static shapes), and the
weights and pools go unchecked (TVM's num_input). GraniteMoE int4s, 1 thread, perf's samples
outside the kernels (scripts/bench/profile_decode.py): 18.0% of a token with a call per segment
and per layer, 13.7% with the step calling them, 11.4% inlined, 10.1-10.2% with the weights
unchecked, 9.3% with static shapes (~5,000 VM instructions a token -> 2,552)."""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from moetvm.artifact import DecodeStep

DECODE_STEP = "decode_step"


def plan_decode_step(split, decode_layers, lm: bool) -> DecodeStep | None:
    """The decode step of a model cut into segments (frontend.SplitProgram), or None where none
    can be built: an LM whose step returns its logits alone (an in-place cache: a concatenated one
    comes back as outputs), every MoE layer with a decode function, and segment parameters whose
    dimensions are constants or symbols (renamed into the step's own)."""
    moe = [s for s in split.program if s.op == "moe"]
    if not lm or len(split.outputs) != 1 or not moe or any(s.layer not in decode_layers for s in moe):
        return None
    taken = _taken_from_outside(split.program, split.segments)
    if not all(isinstance(ty, relax.TensorType) and ty.shape is not None
               and all(isinstance(d, (tirx.IntImm, tirx.Var)) for d in ty.shape.values) for ty in taken.values()):
        return None
    model_inputs = {spec.name for spec in split.inputs}
    return DecodeStep(function=DECODE_STEP, inputs=[n for n in taken if n in model_inputs],
                      weights=[n for n in taken if n not in model_inputs])


def _taken_from_outside(program, module: tvm.IRModule) -> dict:
    """Name -> type, in order of first use, of what the segments take that no step makes: the
    program's inputs and the dense weights."""
    functions = {gv.name_hint: f for gv, f in module.functions_items()}
    produced, taken = set(), {}
    for step in program:
        if step.op == "segment":
            for name, param in zip(step.inputs, functions[step.name].params):
                if name not in produced:
                    taken.setdefault(name, param.ty)
        produced.update(step.outputs)
    return taken


def add_decode_step(module: tvm.IRModule, split, step: DecodeStep, decode_functions: dict[int, str]) -> tvm.IRModule:
    """`module` (the segments, routers and decode functions) with `step.function`:
    (*step.inputs, *step.weights, one pool per MoE step in program order) -> the logits."""
    bb = relax.BlockBuilder(module)
    functions = {gv.name_hint: (gv, f) for gv, f in module.functions_items()}
    types = _taken_from_outside(split.program, module)
    # Each segment has its own symbols: the step shares one per name, and the batch and the
    # sequence (the tokens' dimensions) are 1, so most shapes are constants: no shape is computed
    # at run time and the intermediates are planned statically.
    one = tirx.IntImm("int64", 1)
    dims = {d: one for d in split.inputs[0].shape if isinstance(d, str)}

    def renamed(ty):
        shape = [d if isinstance(d, tirx.IntImm) else dims.setdefault(d.name, tirx.Var(d.name, "int64"))
                 for d in ty.shape.values]
        return relax.TensorType(shape, ty.dtype)

    def inline(gv: tvm.ir.GlobalVar, args: list) -> relax.Expr:
        """Emit a Relax function's body on `args` here, and so the functions it calls: one body
        whose parameters are checked once, and whose intermediates are planned together."""
        f = relax.utils.copy_with_new_vars(module[gv])
        symbols = {}  # the callee's symbols as the arguments have them
        for param, arg in zip(f.params, args):
            for mine, theirs in zip(param.ty.shape.values, arg.ty.shape.values):
                if isinstance(mine, tirx.Var):
                    symbols.setdefault(mine, theirs)
        f = f.bind_symbolic_vars(symbols)
        f = f.bind_params(dict(zip(f.params, args)))
        for block in f.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(binding, relax.VarBinding) and isinstance(value, relax.Call) \
                        and isinstance(value.op, tvm.ir.GlobalVar) and isinstance(module[value.op], relax.Function):
                    binding = relax.VarBinding(binding.var, inline(value.op, list(value.args)))
                bb.emit_normalized(binding)
        return f.body.body

    params = {name: relax.Var(f"input{i}", renamed(types[name])) for i, name in enumerate(step.inputs + step.weights)}
    moe = [s for s in split.program if s.op == "moe"]
    pools = {s.layer: relax.Var(f"pool{s.layer}", functions[decode_functions[s.layer]][1].params[1].ty) for s in moe}
    # The weights and pools (static shapes) go unchecked, as MLC-LLM's do: ~580 VM instructions a
    # GraniteMoE token; the runtime checks them once, through the segments, before the first step.
    with bb.function(step.function, [*params.values(), *pools.values()], attrs={"num_input": len(step.inputs)}):
        with bb.dataflow():
            env = dict(params)
            for s in split.program:
                if s.op == "segment":
                    results = inline(functions[s.name][0], [env[n] for n in s.inputs])
                    env.update((name, bb.emit(relax.TupleGetItem(results, j))) for j, name in enumerate(s.outputs))
                else:
                    # the hidden state is (1, 1, d), as the decode function takes it
                    gv = functions[decode_functions[s.layer]][0]
                    env[s.outputs[0]] = inline(gv, [env[s.inputs[0]], pools[s.layer]])
            logits = bb.emit_output(env[split.outputs[0].name])
        bb.emit_func_output(logits)
    return bb.get()
