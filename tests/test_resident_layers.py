"""Resident MoE layers (issue 14): with every expert loaded, a decode step runs each layer in one
compiled call (top-k, weights, the k experts, their sum), so no routing decision crosses to the
host. It must compute what the host path computes, and never read outside its pool."""

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax

from moetvm.artifact import Router, TensorSpec, read_manifest, slot_layout
from moetvm.compiler import compile_model
from moetvm.compiler import gemv, quant
from moetvm.compiler.quant_kernels import ResidentRouting, expert_module, top_k_kernel
from moetvm.compiler.lowering import relax_pipeline
from moetvm.compiler.build_target import BuildTarget
from moetvm.routing import select_experts
from moetvm.runtime import load_model
from moetvm.targets import get_target

from moetvm.verify import relative_error


def _steps(model, tokens):
    """Logits of a prompt then teacher-forced decode steps, one array per step."""
    cache = model.new_cache()
    logits, cache = model.step(tokens[None, :8], cache)
    out = [logits[0, -1]]
    for t in tokens[8:]:
        logits, cache = model.step(np.array([[t]]), cache)
        out.append(logits[0, -1])
    return out


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory, reference_model):
    return compile_model(reference_model, out=tmp_path_factory.mktemp("int4") / "a", quant="int4", progress=False)


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_resident_layers_compute_what_the_host_path_computes(which, reference_artifact, int4_artifact, heldout_tokens):
    art = reference_artifact if which == "fp32" else int4_artifact
    m = read_manifest(art)
    assert all(layer.resident_function for layer in m.moe_layers)
    resident = load_model(art, cache_budget="100%")
    host = load_model(art, cache_budget=m.cache_bytes - 1)  # one byte short of all: the host path
    assert resident.resident and not host._pools
    tokens = heldout_tokens[5000:5040]
    a, b = _steps(resident, tokens), _steps(host, tokens)
    # fp32: the same sums in another order. int4: the integer-dot kernels quantize activations
    # to int8 per block of 32, so a sum that differs in its last bit can round one activation to
    # the next step (1/254 of its block's largest), and the next steps carry it on.
    assert max(relative_error(x, y) for x, y in zip(a, b)) < (1e-5 if which == "fp32" else 1e-2)
    assert [x.argmax() for x in a] == [y.argmax() for y in b]
    steps, layers = len(tokens) - 8, len(m.moe_layers)
    stats = resident.stats()
    assert stats["resident_layer_calls"] == steps * layers and host.stats()["resident_layer_calls"] == 0
    n_experts = sum(len(layer.experts) for layer in m.moe_layers)
    assert stats["hit_rate"] == 1.0 and stats["preloaded"] == n_experts and stats["expert_loads"] == 0
    # One decode step, one call (format 13: the segments and every layer's decode function in one
    # function); without it (format 12), the segments and one call per layer (its decode function:
    # router and resident layer); without decode functions either, two per layer.
    assert m.decode_step is not None and all(layer.router.library == "segments" for layer in m.moe_layers)
    assert all(layer.decode_function == f"router_{layer.layer}_decode" for layer in m.moe_layers)
    segments = sum(step.op == "segment" for step in m.program)
    # The decode step leaves the weights and pools unchecked: it waits for one step that checks them.
    fresh = load_model(art, cache_budget="100%")
    cache = fresh.new_cache()
    _, cache = fresh.step(tokens[None, :8], cache)
    for position, calls in ((8, segments + layers), (9, 1)):
        before, layer_calls = fresh.timings.call_count, fresh.resident_calls
        _, cache = fresh.step(tokens[None, position:position + 1], cache)
        assert fresh.timings.call_count - before == calls and fresh.resident_calls - layer_calls == layers
    assert fresh.stats()["time_ms"]["decode_steps"] > 0
    # A batch of two after the one-call step is in use: its steps go through the segments (the
    # one-call step is for one token of one sequence), each row the single sequence's logits.
    pair = fresh.new_cache(2)
    logits, pair = fresh.step(np.stack([tokens[:8]] * 2), pair)
    for position in (8, 9):
        logits, pair = fresh.step(np.array([[tokens[position]]] * 2), pair)
        for row in logits[:, -1]:
            assert relative_error(row, a[position - 7]) < 1e-5
    # The paths below run the same kernels, up to float rounding (~1e-7); an int8 cache in dot order
    # rounds the query and the softmax weights to 8 bits, where such a difference can tip one
    # rounding, and that step's keys and values carry it on (measured: 1e-7 until a step near the
    # 12th, then ~1e-3 of the largest logit).
    same_kernels = 1e-2 if m.model.kv.dot else 1e-6
    cache = resident.new_cache()
    _, cache = resident.step(tokens[None, :8], cache)
    resident.manifest = dataclasses.replace(resident.manifest, decode_step=None)
    per_layer = _steps(resident, tokens)
    assert max(relative_error(x, y) for x, y in zip(a, per_layer)) < same_kernels
    before = resident.timings.call_count
    resident.step(tokens[None, 8:9], cache)
    assert resident.timings.call_count - before == segments + layers
    for index, layer in resident._layers.items():
        resident._layers[index] = dataclasses.replace(layer, decode_function=None)
    resident._thread.__dict__.pop("resident_plans")
    two_calls = _steps(resident, tokens)
    assert max(relative_error(x, y) for x, y in zip(a, two_calls)) < same_kernels
    before = resident.timings.call_count
    resident.step(tokens[None, 8:9], cache)
    assert resident.timings.call_count - before == segments + 2 * layers


# Resident layer kernels: fp32/fp16 and, on CPUs with integer dot products, int4/int8 run the
# whole layer as one kernel (gemv.resident_layer); int4/int8 without them (the A72) compose the
# experts' own GEMVs.
SCHEMES = {"fp32": quant.Scheme("fp32", tile=64), "fp16": quant.Scheme("fp16", tile=64),
           "int4": quant.scheme("int4").tiled(64, dot=True, vnni=get_target("host").int8_dot),
           "int8": quant.scheme("int8").tiled(64, dot=True),
           "int4-nodot": quant.scheme("int4").tiled(64),
           "int4s": quant.scheme("int4", int4_symmetric=True).tiled(64, dot=True, vnni=get_target("host").int8_dot),
           "int4s-nodot": quant.scheme("int4", int4_symmetric=True).tiled(64)}
needs_dot = pytest.mark.skipif(not get_target("host").int8_dot, reason="this CPU has no int8 integer dot products (VNNI)")
needs_int4_dot = pytest.mark.skipif(not get_target("host").int4_dot, reason="this CPU has no int4 integer dot products (AVX2)")
SCHEME_CASES = ["fp32", "fp16", "int4-nodot", "int4s-nodot", pytest.param("int4", marks=needs_int4_dot),
                pytest.param("int4s", marks=needs_int4_dot), pytest.param("int8", marks=needs_dot)]


def _resident_module(n_experts: int, top_k: int, normalize: bool, scaling: float, d: int = 64, d_ff: int = 128,
                     scheme: str = "fp32"):
    s = SCHEMES[scheme]
    params = [TensorSpec(n, list(shape), dtype) for n, shape, dtype in quant.expert_params(d, d_ff, s)]
    offsets, slot_bytes = slot_layout(params)
    routing = ResidentRouting("layer", n_experts, top_k, normalize, scaling)
    mod = expert_module(d, d_ff, s, "expert", (top_k,), resident=(routing,), slot=(offsets, slot_bytes))
    target = BuildTarget.resolve("host").tvm
    vm = relax.VirtualMachine(tvm.compile(relax.transform.ConvertToDataflow()(mod), target,
                                          relax_pipeline=relax_pipeline(target)), tvm.cpu())
    rng = np.random.default_rng(n_experts)
    experts = [quant.quantize_expert(quant.kernel_layout(*(rng.standard_normal(shape).astype(np.float32) * 0.1
                                                           for shape in ((d_ff, d), (d_ff, d), (d, d_ff)))), s)
               for _ in range(n_experts)]
    pool = np.zeros(n_experts * slot_bytes, np.uint8)
    for e, tensors in enumerate(experts):
        for spec, offset in zip(params, offsets):
            raw = tensors[spec.name].tobytes()
            pool[e * slot_bytes + offset: e * slot_bytes + offset + len(raw)] = np.frombuffer(raw, np.uint8)
    return vm, experts, tvm.runtime.tensor(pool)


def _host_layer(x, scores, experts, router: Router, vm) -> np.ndarray:
    """The host path: select_experts, then the k experts' own kernels, summed in expert order."""
    indices, weights = select_experts(scores, router)
    out = np.zeros_like(x)
    for j in np.argsort(indices[0], kind="stable"):
        tensors = experts[indices[0, j]]
        y = vm["expert"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(t) for t in tensors.values()])  # stored order
        out += y.numpy() * weights[0, j]
    return out


@pytest.mark.parametrize("scheme", SCHEME_CASES)
@pytest.mark.parametrize("normalize, scaling", [(True, 1.0), (False, 2.5)])
def test_resident_top_k_selects_and_weights_as_the_host_does(normalize, scaling, scheme):
    n, k = 8, 3
    vm, experts, pool = _resident_module(n, k, normalize, scaling, scheme=scheme)
    fused = gemv.fuses_resident_layer(SCHEMES[scheme])
    assert fused == (not scheme.endswith("-nodot"))
    router = Router(library="", function="", n_experts=n, top_k=k, score_fn="softmax", normalize=normalize, scaling=scaling)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    cases = {
        "random": rng.dirichlet(np.ones(n)).astype(np.float32)[None],
        "all tied": np.full((1, n), 1 / n, np.float32),  # the lowest indices win, as np.argsort(stable) picks
        "tie at the cut": np.array([[0.1, 0.3, 0.2, 0.05, 0.2, 0.05, 0.05, 0.05]], np.float32),
    }
    for name, scores in cases.items():
        got = vm["layer"](tvm.runtime.tensor(x), tvm.runtime.tensor(scores), pool).numpy()
        want = _host_layer(x, scores, experts, router, vm)
        # The fused kernel's silu takes a polynomial exp (within 2e-7), not libm's: an activation
        # may round differently.
        assert relative_error(got, want) < (1e-5 if fused else 1e-6), name


def test_the_decode_step_takes_no_view_of_a_view_and_builds_no_tuple(int4_artifact):
    """The one-call step's VM code (the instructions a token runs): a chain of reshapes is one
    view, and no kernel's outputs are packed into a tuple nothing reads (collapse_reshapes,
    drop_unused_tuples); its top-k scores the router's logits (no softmax kernel of its own); the
    residual connections are kernels' epilogues."""
    m = read_manifest(int4_artifact)
    library = next(lib for lib in m.libraries if lib.name == "segments")
    text = relax.VMExecutable(tvm.runtime.load_module(str(int4_artifact / library.file.path))).as_text()
    body = text.split(f"@{m.decode_step.function}:", 1)[1].split("\n@", 1)[0]
    calls = [line.split() for line in body.splitlines() if line.strip().startswith("call")]
    views = {c[-1] for c in calls if c[1] == "vm.builtin.reshape"}
    assert views and not [c for c in calls if c[1] == "vm.builtin.reshape" and c[3].rstrip(",") in views]
    assert not [c for c in calls if c[1] == "vm.builtin.make_tuple"]
    assert not [c for c in calls if c[1].startswith("softmax")]
    assert len([c for c in calls if c[1].startswith("top")]) == len(m.moe_layers)
    # the residual connections after attention's output projection (a GEMV) and after each MoE
    # layer are those kernels' epilogues (residual_into_kernels)
    fused = [c[1] for c in calls if c[1].endswith("_residual")]
    assert len([f for f in fused if f.endswith("_layer_residual")]) == len(m.moe_layers)
    assert len([f for f in fused if "_matmul_" in f]) == len(m.moe_layers)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_top_k_scores_the_logits_as_the_router_does(score_fn):
    """A decode function's top-k takes the router's logits and scores them itself (one kernel a
    layer fewer): the experts and weights the router's scores give the host path, to float32
    rounding, the ties included."""
    n, k = 32, 8
    bb = relax.BlockBuilder()
    logits = relax.Var("logits", relax.TensorType((1, n), "float32"))
    with bb.function("main", [logits]):
        with bb.dataflow():
            kernel = bb.add_func(top_k_kernel(ResidentRouting("layer", n, k, True, 1.0), cpu=True, score_fn=score_fn), "top_k")
            out = bb.emit_output(bb.emit(relax.call_tir(kernel, [logits], [relax.TensorType((k,), "int64"),
                                                                            relax.TensorType((1, k), "float32")])))
        bb.emit_func_output(out)
    target = BuildTarget.resolve("host").tvm
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    router = Router(library="", function="", n_experts=n, top_k=k, score_fn=score_fn, normalize=True, scaling=1.0)
    rng = np.random.default_rng(3)
    for z in (rng.standard_normal((1, n)).astype(np.float32) * 3, np.zeros((1, n), np.float32)):
        scores = np.exp(z - z.max()) / np.exp(z - z.max()).sum() if score_fn == "softmax" else 1 / (1 + np.exp(-z))
        chosen, weights = vm["main"](tvm.runtime.tensor(z))
        indices, want = select_experts(scores.astype(np.float32), router)
        order = np.argsort(indices[0], kind="stable")
        assert chosen.numpy().tolist() == indices[0][order].tolist()
        np.testing.assert_allclose(weights.numpy()[0], want[0][order], rtol=1e-6)


@pytest.mark.parametrize("scheme", SCHEME_CASES)
def test_resident_layer_stays_in_its_pool_whatever_the_scores(scheme):
    """NaN and infinite scores still choose k distinct experts in range: every view is inside the
    pool (TVM refuses an out-of-bounds view, so a wrong index would raise here; the fused kernel
    clamps ids into range)."""
    vm, _, pool = _resident_module(8, 3, True, 1.0, scheme=scheme)
    x = tvm.runtime.tensor(np.ones((1, 64), np.float32))
    for scores in ([np.nan] * 8, [-np.inf] * 8, [np.inf, np.nan, -np.inf, 0, 0, np.nan, 1, np.inf]):
        vm["layer"](x, tvm.runtime.tensor(np.array([scores], np.float32)), pool)
    with pytest.raises(Exception):  # a pool of the wrong size is refused by the function's signature
        vm["layer"](x, tvm.runtime.tensor(np.zeros((1, 8), np.float32)), tvm.runtime.tensor(np.zeros(64, np.uint8)))


def _mapping(address: int) -> dict[str, str]:
    """The smaps fields of this process's mapping that holds `address`."""
    fields, start, end = {}, None, None
    for line in open("/proc/self/smaps"):
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            if start is not None and start <= address < end:
                break
            fields, (start, end) = {}, (int(v, 16) for v in head.split("-"))
        else:
            fields[head.rstrip(":")] = rest.strip()
    if start is None or not start <= address < end:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields


def _thp_enabled() -> bool:
    try:
        return "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no transparent huge pages here")
def test_what_every_token_reads_lives_in_huge_page_memory(reference_artifact, heldout_tokens):
    """Dense weights, expert pools and the KV cache are advised for huge pages ("hg") where they
    fill whole ones: 4 KB pages made the int4 GraniteMoE decode token 5-50% slower and its speed
    vary between processes. A block's last partial huge page, and a block smaller than one (the
    shipped model's weight files, a short KV cache), takes small pages ("nh"): a huge page there
    backs up to 2 MB never used (test_a_blocks_partial_huge_page_takes_small_pages)."""
    model = load_model(reference_artifact, cache_budget="100%")
    cache = model.new_cache()
    model.step(heldout_tokens[None, :8], cache)
    # (an untied input embedding table is not read whole: it stays in small pages, runtime/lookup_table.py)
    lookups = {t.name for w in model.manifest.weights for t in w.tensors if t.lookup_rows is not None}
    weights = [tensor for name, tensor in model._weights.items() if name not in lookups]
    pools = [pool for pool, _ in model._pools.values()]
    assert weights and pools and cache.keys
    for tensor in [weights[0], weights[-1], pools[0], pools[-1], cache.keys[0], cache.values[-1]]:
        flags = _mapping(tensor.data_ptr())["VmFlags"].split()
        assert "hg" in flags or "nh" in flags, tensor.shape  # placed by host_arrays, never left to the default
        assert tensor.data_ptr() % 64 == 0
    for pool in pools:  # 3 MB each, in one 12 MB block: whole huge pages
        assert "hg" in _mapping(pool.data_ptr())["VmFlags"].split()
    for name in lookups:
        assert "nh" in _mapping(model._weights[name].data_ptr())["VmFlags"].split(), name
    if _thp_enabled():  # filled blocks are huge pages now, whatever the fault got (host_memory.settle)
        for tensor in (pools[0], pools[-1]):
            assert int(_mapping(tensor.data_ptr())["AnonHugePages"].split()[0]) > 0, tensor.shape


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no transparent huge pages here")
def test_a_blocks_partial_huge_page_takes_small_pages():
    from moetvm.runtime.host_memory import HUGE_PAGE, host_arrays

    _, (whole_and_half, tail) = host_arrays([((HUGE_PAGE * 2 + HUGE_PAGE // 2,), "uint8"), ((1000,), "float32")])
    assert whole_and_half.ctypes.data % HUGE_PAGE == 0
    assert "hg" in _mapping(whole_and_half.ctypes.data)["VmFlags"].split()
    assert "hg" in _mapping(whole_and_half.ctypes.data + HUGE_PAGE * 2 - 1)["VmFlags"].split()
    assert "nh" in _mapping(whole_and_half.ctypes.data + HUGE_PAGE * 2)["VmFlags"].split()
    assert "nh" in _mapping(tail.ctypes.data)["VmFlags"].split()
    _, (small,) = host_arrays([((HUGE_PAGE // 4,), "uint8")])
    assert "nh" in _mapping(small.ctypes.data)["VmFlags"].split()
    whole_and_half[:] = 1  # written whole: two huge pages, the half in small ones
    if _thp_enabled():
        assert int(_mapping(whole_and_half.ctypes.data)["AnonHugePages"].split()[0]) <= 2 * HUGE_PAGE // 1024
