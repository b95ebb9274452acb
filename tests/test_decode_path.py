"""The decode path at long context (issue 14): the KV-sized layout operations are views or
row-wise copies, not per-element index arithmetic, and a long greedy decode still matches
PyTorch token for token. Speed itself is measured by scripts, not asserted here."""

import itertools
import math

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from moetvm.artifact import lm_io_names
from moetvm.compiler import find_moe_layers
from moetvm.compiler import frontend
from moetvm.compiler.dense_weights import store_dense_weights
from moetvm.compiler.quant import scheme
from moetvm.compiler.lowering import relax_pipeline
from moetvm.compiler.build_target import BuildTarget
from moetvm.runtime import load_model

from moetvm.verify import relative_error
from hf_models import greedy_ids


@pytest.fixture(scope="module")
def lowered_segments(reference_model):
    """The reference model's segments as the host pipeline lowers them (before code generation)."""
    specs = find_moe_layers(reference_model)
    names_in, names_out = lm_io_names(reference_model.kv_layout[0])
    mod, dense = store_dense_weights(frontend.export_causal_lm(reference_model, specs), scheme("fp32"))
    split = frontend.split_at_moe_layers(mod, names_in, names_out, dense.names)
    target = BuildTarget.resolve("host").tvm
    with target:
        return relax_pipeline(target)(relax.transform.ConvertToDataflow()(split.segments))


def test_kv_layout_changes_are_views_not_kernels(lowered_segments):
    """torch's attention reshapes the (batch, heads, past, dim) cache and `expand`s it to the
    shape it already has; lowered naively each was a kernel copying the whole cache every token
    (1-4 ms each at 512 positions). Reshapes must be views, identity broadcasts gone."""
    kernels = [gv.name_hint for gv, f in lowered_segments.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert not [k for k in kernels if k.startswith(("reshape", "broadcast_to"))], kernels


def test_each_rms_norm_is_one_kernel(lowered_segments):
    """x * rsqrt(mean(x ** 2) + eps) * w lowers to relax's rms_norm: one kernel a norm, where
    FuseOps left the square as a kernel of its own (it fuses no elementwise producer into a
    reduction). The fp32 tests against PyTorch hold its numerics."""
    kernels = [gv.name_hint for gv, f in lowered_segments.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("rms_norm" in k for k in kernels), kernels
    assert not [k for k in kernels if k.startswith("power") or "mean" in k], kernels


def test_rms_norm_rewrite_leaves_other_reductions_alone():
    """Only the norm's exact shape is rewritten: a cube's mean, or a mean over another axis,
    stays as it was."""
    from moetvm.compiler.lowering import rms_norm_as_one_op

    def norm(exponent: float, axis: int) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        x, w = relax.Var("x", relax.TensorType((1, 4, 8), "float32")), relax.Var("w", relax.TensorType((8,), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                mean = relax.op.mean(relax.op.power(x, relax.const(exponent, "float32")), axis=[axis], keepdims=True)
                scaled = relax.op.multiply(x, relax.op.rsqrt(relax.op.add(mean, relax.const(1e-6, "float32"))))
                out = bb.emit_output(bb.emit(relax.op.multiply(scaled, w)))
            bb.emit_func_output(out)
        return rms_norm_as_one_op(bb.get())

    def ops(mod) -> set[str]:
        return {c.op.name for c in _calls(mod["main"])}

    assert "relax.nn.rms_norm" in ops(norm(2.0, -1)) and "relax.power" not in ops(norm(2.0, -1))
    for exponent, axis in ((3.0, -1), (2.0, 1)):
        assert "relax.nn.rms_norm" not in ops(norm(exponent, axis)) and "relax.power" in ops(norm(exponent, axis))


def test_reshape_chains_collapse_and_round_trips_vanish():
    """A chain of reshapes is one view, and a chain back to the shape it started from none: each
    was a vm.builtin.reshape (a view object made and freed) a decode step."""
    from moetvm.compiler.lowering import collapse_reshapes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            rows = bb.emit(relax.op.reshape(x, [1, 64]))
            heads = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(rows, [1, 1, 64])), [1, 1, 4, 16]))
            back = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(x, [1, 64])), [1, 1, 64]))
            out = bb.emit_output(relax.Tuple([heads, back]))
        bb.emit_func_output(out)
    func = collapse_reshapes(bb.get())["main"]
    reshapes = [c for c in _calls(func) if c.op.name == "relax.reshape"]
    # x -> (1, 1, 4, 16) directly; the round trip leaves no reshape at all
    assert len(reshapes) == 1 and reshapes[0].args[0].same_as(func.params[0])
    assert [int(d) for d in reshapes[0].ty.shape.values] == [1, 1, 4, 16]


def _residual_after_gemv(scale: float | None, reuse: bool = False):
    """residual + reshape(fp32 GEMV(x)) [* scale] as a decode step has it after attention's
    output projection: (module, x, residual, weight (K, N)); `reuse`: the GEMV's rows also
    returned (so they must stay)."""
    from moetvm.compiler import gemv, quant

    k_dim, n_dim = 64, 128
    s = quant.scheme("fp32").tiled(64)
    w = np.random.default_rng(0).standard_normal((k_dim, n_dim)).astype(np.float32)
    stored = quant.quantize(w, s)[""]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, k_dim), "float32"))
    r = relax.Var("r", relax.TensorType((1, 1, n_dim), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            kernel = bb.add_func(gemv.matmul(k_dim, n_dim, s), "gemv")
            rows = bb.emit(relax.call_tir(kernel, [x, relax.const(stored)], relax.TensorType((1, n_dim), "float32")))
            term = bb.emit(relax.op.reshape(rows, [1, 1, n_dim]))
            if scale is not None:
                term = bb.emit(relax.op.multiply(term, relax.const(scale, "float32")))
            out = bb.emit(relax.op.add(r, term))
            out = bb.emit_output(relax.Tuple([out, rows]) if reuse else out)
        bb.emit_func_output(out)
    return bb.get(), w


@pytest.mark.parametrize("scale, reuse", [(0.22, False), (None, False), (0.22, True)])
def test_a_residual_connection_is_the_gemv_epilogue(scale, reuse):
    """residual + rows * multiplier (GraniteMoE) or residual + rows after a CPU GEMV is one kernel
    writing the new residual stream, as a NumPy reference computes it; where the GEMV's rows are
    also used elsewhere, nothing is fused (the GEMV would run twice)."""
    from moetvm.compiler.lowering import residual_into_kernels

    mod, w = _residual_after_gemv(scale, reuse)
    fused = residual_into_kernels(mod)
    kernels = {gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert ("gemv_residual" in kernels) == (not reuse), kernels
    assert {c.op.name for c in _calls(fused["main"])} >= ({"relax.add"} if reuse else set())
    if not reuse:
        assert not {"relax.add", "relax.multiply", "relax.reshape"} & {c.op.name for c in _calls(fused["main"])}
    target = BuildTarget.resolve("host").tvm
    vm = relax.VirtualMachine(tvm.compile(relax.transform.ConvertToDataflow()(mod), target,
                                          relax_pipeline=relax_pipeline(target)), tvm.cpu())
    rng = np.random.default_rng(1)
    x, r = rng.standard_normal((1, 64)).astype(np.float32), rng.standard_normal((1, 1, 128)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r))
    got = (got[0] if reuse else got).numpy()
    want = r + (x @ w)[None] * (1.0 if scale is None else scale)
    assert relative_error(got, want) < 1e-6


def _calls(func) -> list:
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return found


@pytest.mark.slow
def test_long_greedy_decode_matches_pytorch(reference_artifact, reference_model, heldout_tokens):
    """320 decode steps (positions 32..351) through the runtime's KV cache: the same greedy tokens
    as PyTorch's full forward, and the last step's logits within 1e-4."""
    prompt = heldout_tokens[:32]
    model = load_model(reference_artifact, cache_budget="100%")
    ours = model.generate(prompt, 320)
    assert ours == greedy_ids(reference_model, prompt, 320)
    full = np.concatenate([prompt, np.array(ours[:-1])])[None]
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(full)).numpy()
    assert relative_error(model(full)[:, -1], expected[:, -1]) < 1e-4


def test_a_long_prompt_is_prefilled_in_chunks_as_pytorch_reads_it_whole(reference_artifact, reference_model,
                                                                         heldout_tokens):
    """A generation's prompt goes through the model PREFILL_CHUNK tokens per step (each step's
    activations and logits bounded), the later chunks attending to the cache the earlier ones
    wrote: 300 tokens (chunks of 128, 128, 44) give PyTorch's greedy tokens, and the same chunks
    through `step` give the last prompt position's logits within 1e-4 of a forward over the whole
    prompt."""
    from moetvm.runtime import model as runtime_model

    prompt = heldout_tokens[:300]
    assert runtime_model.PREFILL_CHUNK < 300 - runtime_model.PREFILL_CHUNK
    model = load_model(reference_artifact, cache_budget="100%")
    ours = model.generate(prompt, 8)
    ids = torch.from_numpy(prompt[None])
    theirs = []
    with torch.no_grad():
        first = reference_model(ids)[0, -1].numpy()
        for _ in range(8):
            theirs.append(int(reference_model(ids)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[theirs[-1]]])], dim=1)
    assert ours == theirs
    cache = model.new_cache()
    for start in range(0, 300, runtime_model.PREFILL_CHUNK):
        logits, cache = model.step(prompt[None, start:start + runtime_model.PREFILL_CHUNK], cache)
    assert relative_error(logits[0, -1], first) < 1e-4


def test_a_prefill_runs_the_lm_head_on_the_last_position_alone(reference_artifact, heldout_tokens, monkeypatch):
    """The compiler marks the final segment (norm and LM head: no positions, no cache read)
    per_position and no other; `step(last_only=True)` and a generation's prefill hand it the last
    position's rows alone, and its logits equal the last row of a whole step's."""
    model = load_model(reference_artifact, cache_budget="100%")
    *body, final = model.manifest.program
    assert final.op == "segment" and final.per_position and final.outputs == ["logits"]
    assert not any(step.per_position for step in body)  # they attend, or are MoE layers
    rows_seen = []
    call = model._call

    def spy(library, function, *args):  # the real call, noting how many positions the LM head got
        if function == final.name:
            rows_seen.append(args[0].shape[1])
        return call(library, function, *args)

    monkeypatch.setattr(model, "_call", spy)
    prompt = heldout_tokens[None, :40]
    whole, _ = model.step(prompt, model.new_cache())
    last, _ = model.step(prompt, model.new_cache(), last_only=True)
    assert rows_seen == [40, 1]
    assert last.shape == (1, 1, whole.shape[-1])
    np.testing.assert_allclose(last[0, 0], whole[0, -1], rtol=1e-5, atol=1e-5)
    rows_seen.clear()
    model.generate(heldout_tokens[:200], 3)
    # two prefill chunks, then the first token fed back; the second runs in the decode step
    assert rows_seen == [1, 1, 1] and model.stats()["time_ms"]["decode_steps"] > 0


def test_a_prefill_drops_each_intermediate_after_its_last_reader(reference_artifact):
    """A step of the program (a prefill chunk, or any multi-token call) frees each value right
    after the last step that reads it, so it holds one layer's activations at a time, not every
    layer's: on the artifact's real program, every intermediate is dropped exactly once, at a
    step that reads or makes it, never before a later reader, and no program output is dropped.
    (A wrong drop would also fail the prefill tests above with a missing value.)"""
    model = load_model(reference_artifact, cache_budget="100%")
    program = model.manifest.program
    outputs = {spec.name for spec in model.manifest.outputs}
    dead = model._dead_after
    dropped = [name for names in dead for name in names]
    assert len(dropped) == len(set(dropped))
    assert {name for step in program for name in step.outputs} - outputs <= set(dropped)
    assert not outputs & set(dropped)
    for index, names in enumerate(dead):
        assert set(names) <= set(program[index].inputs) | set(program[index].outputs)
        assert not set(names) & {name for step in program[index + 1:] for name in step.inputs}


def test_a_generation_reserves_the_positions_it_can_reach(reference_artifact, heldout_tokens, monkeypatch):
    """A generation knows every position it can write (prompt + new tokens - 1): its in-place
    cache holds that many, to the capacity multiple, not the 256 a cache grown step by step
    starts with (fp32 GraniteMoE: 12 of 24 MB resident from the first write, on huge pages).
    A cache grown by `step` still doubles, the cached positions kept."""
    from moetvm.runtime import model as runtime_model

    model = load_model(reference_artifact, cache_budget="100%")
    multiple = model.manifest.model.kv.capacity_multiple
    assert model.manifest.model.kv.layout == "in_place" and multiple < runtime_model.KVCache.INITIAL_CAPACITY
    capacities = []
    reserve = runtime_model.KVCache.reserve

    def noting(cache, positions, *args, **kwargs):  # the real reserve, noting the capacity it left
        reserve(cache, positions, *args, **kwargs)
        capacities.append(cache.capacity)

    monkeypatch.setattr(runtime_model.KVCache, "reserve", noting)
    prompt, new = heldout_tokens[:16], multiple + 2  # prompt + new - 1 positions: one more than a multiple
    assert len(model.generate(prompt, new)) == new
    assert set(capacities) == {2 * multiple}
    capacities.clear()
    cache = model.new_cache()
    logits, cache = model.step(prompt[None], cache)
    for token in heldout_tokens[16:16 + runtime_model.KVCache.INITIAL_CAPACITY]:
        logits, cache = model.step(np.array([[token]]), cache)
    assert capacities[0] == runtime_model.KVCache.INITIAL_CAPACITY and capacities[-1] == 2 * runtime_model.KVCache.INITIAL_CAPACITY
    held = sum(math.prod(t.shape) * np.dtype(str(t.dtype)).itemsize for t in cache.keys + cache.values)
    assert held == cache.capacity * model.manifest.model.kv_position_bytes  # the manifest's count, the benchmark's floor
    stepped = logits[0, -1]
    whole, _ = model.step(heldout_tokens[None, :17 + runtime_model.KVCache.INITIAL_CAPACITY - 1], model.new_cache())
    assert relative_error(stepped, whole[0, -1]) < 1e-4  # the positions cached before the growth were kept


def _dot_kernels(kv_heads: int):
    """compiler/attention.py's dot-order kernels (append keys, append values, attend) for 8 query
    heads of 16 key and 32 value dimensions over `kv_heads`, built for the host."""
    from moetvm.compiler import attention

    target = BuildTarget.resolve("host").tvm
    block = attention.key_block(8, kv_heads)
    funcs = {"keys": attention.append_keys(kv_heads, 16, "int8", block, True),
             "values": attention.append_values(kv_heads, 32, "int8", block, True),
             "attend": attention.cached_attention(8, kv_heads, 16, 32, "int8", 16 ** -0.5, block, True)}
    built = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    return block, {n: built[n] for n in funcs}


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
def test_dot_order_holds_the_int8_cache_and_attends_within_its_rounding(kv_heads):
    """The int8 cache in dot order (artifact.KVCacheLayout.dot, CPUs with AVX512-VNNI): its appends
    store exactly the numbers of the plain int8 cache (the op's eager semantics), reordered (keys
    offset by 128, scales as float32 runs); its attention, with the query and the softmax weights
    rounded to 8 bits for the integer dots, stays within 2e-2 of the largest output of the eager op
    on the plain cache; past lengths 0, 7, 70 (within and past a block), 1 and 5 new positions,
    batch 2, 1 to 4 query heads a task. (Measured: up to 1.1e-2 at 71 positions. Random queries
    and keys attend almost evenly, so the output is a mean of random rows, small against them,
    and the weights' rounding, ~0.1% of a block's largest weight a position, does not average
    out as they do: the same order as the values' own int8 rounding.)"""
    if not BuildTarget.resolve("host").int8_dot:
        pytest.skip("this CPU has no AVX512-VNNI: its int8 cache keeps the plain order")
    from moetvm.compiler.kv_cache import _cached_attention

    block, kernels = _dot_kernels(kv_heads)
    rng = np.random.default_rng(3)
    blocks = 128 // block
    worst = 0.0
    for past, new in [(0, 1), (0, 5), (7, 1), (7, 5), (70, 1), (70, 5)]:
        q = rng.standard_normal((2, 8, new, 16)).astype(np.float32)
        k = rng.standard_normal((2, kv_heads, past + new, 16)).astype(np.float32)
        v = rng.standard_normal((2, kv_heads, past + new, 32)).astype(np.float32)
        keys = torch.zeros(2, kv_heads, blocks, 16 + 4, block, dtype=torch.int8)
        values = torch.zeros(2, kv_heads, blocks, block, 32 + 4, dtype=torch.int8)
        if past:
            _cached_attention(torch.zeros(2, 8, past, 16), torch.from_numpy(k[:, :, :past]), torch.from_numpy(v[:, :, :past]),
                              keys, values, torch.zeros(2, 0, dtype=torch.long), 1.0)
        want = _cached_attention(torch.from_numpy(q), torch.from_numpy(k[:, :, past:]), torch.from_numpy(v[:, :, past:]),
                                 keys, values, torch.zeros(2, past, dtype=torch.long), 16 ** -0.5).numpy()

        dot_keys = tvm.runtime.tensor(np.zeros((2, kv_heads, blocks, 16 // 4 + 1, block * 4), np.int8))
        dot_values = tvm.runtime.tensor(np.zeros((2, kv_heads, blocks, block * (32 + 4)), np.int8))
        for start, stop in [(0, past), (past, past + new)]:  # the past, then this step's, as a decode appends them
            if stop > start:
                kernels["keys"](dot_keys, tvm.runtime.tensor(np.ascontiguousarray(k[:, :, start:stop])), start)
                kernels["values"](dot_values, tvm.runtime.tensor(np.ascontiguousarray(v[:, :, start:stop])), start)
        out = tvm.runtime.tensor(np.zeros((2, new, 8, 32), np.float32))
        kernels["attend"](tvm.runtime.tensor(q), dot_keys, dot_values, past, out,
                          tvm.runtime.tensor(np.zeros((2, 8, new, 128), np.float32)))

        # the same numbers, reordered: dot keys [d // 4, 4 l + d % 4] (+128), scales in the last row
        n = past + new
        dk = dot_keys.numpy().reshape(2, kv_heads, blocks, 16 // 4 + 1, block, 4)
        plain_k = keys.numpy().reshape(2, kv_heads, blocks, 16 + 4, block)
        got_k = dk[:, :, :, :4].view(np.uint8).transpose(0, 1, 2, 3, 5, 4).reshape(2, kv_heads, blocks, 16, block).astype(np.int16) - 128
        flat = lambda x: x.transpose(0, 1, 2, 4, 3).reshape(2, kv_heads, blocks * block, -1)[:, :, :n]  # noqa: E731
        np.testing.assert_array_equal(flat(got_k), flat(plain_k[:, :, :, :16].astype(np.int16)))
        np.testing.assert_array_equal(flat(dk[:, :, :, 4].transpose(0, 1, 2, 4, 3)), flat(plain_k[:, :, :, 16:]))
        # dot values: (j // 4) groups of (32 dims x 4 positions), then each position's 4 scale bytes
        dv = dot_values.numpy().reshape(2, kv_heads, blocks, block * 36)
        rows = dv[..., :block * 32].reshape(2, kv_heads, blocks, block // 4, 32, 4).transpose(0, 1, 2, 3, 5, 4)
        rows = np.concatenate([rows.reshape(2, kv_heads, blocks, block, 32), dv[..., block * 32:].reshape(2, kv_heads, blocks, block, 4)], -1)
        np.testing.assert_array_equal(rows.reshape(2, kv_heads, blocks * block, 36)[:, :, :n],
                                      values.numpy().reshape(2, kv_heads, blocks * block, 36)[:, :, :n])
        worst = max(worst, relative_error(out.numpy(), want))
    assert worst < 2e-2, worst


@pytest.fixture(scope="module")
def attention_kernels():
    """compiler/attention.py's kernel for 8 query heads over 8, 4, 2 and 1 KV heads (no sharing,
    groups of 2 and 4 heads scored together, a group of 8 in two tasks of 4) at each cache dtype, built for the host, for a cache
    in blocks of its key block (as compiled models have it) and of 64 positions (key blocks of
    fewer positions within a cache block)."""
    import tvm

    from moetvm.compiler import attention

    target = BuildTarget.resolve("host").tvm
    built = {}
    for kv_heads in (8, 4, 2, 1):
        for dtype in ("float32", "float16", "int8"):
            for block in {attention.key_block(8, kv_heads), 64}:
                func = attention.cached_attention(8, kv_heads, 16, 24, dtype, 16 ** -0.5, block).with_attr("global_symbol", "attend")
                built.setdefault((kv_heads, dtype), []).append(
                    (block, tvm.compile(tvm.IRModule({"attend": func}), target=target)["attend"]))
    return built


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_attention_kernel_matches_the_eager_op(attention_kernels, kv_heads, dtype):
    """The attention kernel against the op's eager semantics (compiler/kv_cache.py) on the same
    stored cache (both block sizes of the fixture): past lengths 0, 7 and 70 (a partial block, past a block), 1 and 5 new
    positions, batch 2, query heads sharing their KV head or not, within 1e-5 relative."""
    import tvm

    from moetvm.compiler.kv_cache import _cached_attention

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[dtype]
    extra = 4 if dtype == "int8" else 0
    rng = np.random.default_rng()
    for (block, kernel), (past, new) in itertools.product(attention_kernels[kv_heads, dtype],
                                                          [(0, 1), (0, 5), (7, 1), (7, 5), (70, 1), (70, 5)]):
        q = torch.from_numpy(rng.standard_normal((2, 8, new, 16)).astype(np.float32))
        k, v = (torch.from_numpy(rng.standard_normal((2, kv_heads, past + new, d)).astype(np.float32)) for d in (16, 24))
        keys = torch.zeros(2, kv_heads, 128 // block, 16 + extra, block, dtype=torch_dtype)  # 128 positions
        values = torch.zeros(2, kv_heads, 128 // block, block, 24 + extra, dtype=torch_dtype)
        # the past through the op's own appends, then this step's, as the kernels' appends do
        if past:
            _cached_attention(torch.zeros(2, 8, past, 16), k[:, :, :past], v[:, :, :past], keys, values,
                              torch.zeros(2, 0, dtype=torch.long), 1.0)
        want = _cached_attention(q, k[:, :, past:], v[:, :, past:], keys, values, torch.zeros(2, past, dtype=torch.long),
                                 16 ** -0.5).numpy()
        out = tvm.runtime.tensor(np.zeros((2, new, 8, 24), np.float32))
        kernel(tvm.runtime.tensor(q.numpy()), tvm.runtime.tensor(keys.numpy()), tvm.runtime.tensor(values.numpy()),
               past, out, tvm.runtime.tensor(np.zeros((2, 8, new, 128), np.float32)))
        assert relative_error(out.numpy(), want) < 1e-5, (block, past, new)
