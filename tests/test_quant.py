"""Weight quantization: fused kernels against NumPy, packing, errors, and accuracy on the shipped model."""

import numpy as np
import pytest
import torch
import tvm
from tvm.runtime.vm import VirtualMachine

from moetvm.compiler import compile_model, quant
from moetvm.compiler.build_target import BuildTarget
from moetvm.compiler.lowering import build_library
from moetvm.artifact import fused_function
from moetvm.compiler.quant_kernels import expert_module, router_module
from moetvm.targets import get_target
from moetvm.verify import relative_error


def _ref_swiglu(x, w, s):
    a = quant.quantize_activations if s.dot else (lambda v: v)  # the integer-dot kernels' rounding
    g = a(x) @ w["w_gate"]
    return a(g / (1 + np.exp(-g)) * (a(x) @ w["w_up"])) @ w["w_down"]


# Every storage layout: plain (the TE form GPU targets get), tiled (the CPU GEMV kernels with fp32
# products), dot-interleaved (the integer-dot kernels, where the CPU has them); int4 also without
# zero points ("int4s": symmetric, q4_0's format) in each.
NAMES = (*quant.SCHEMES, "int4s")
LAYOUTS = [(name, None, False) for name in NAMES] + [(name, 32, False) for name in NAMES] + [
    ("int8", 32, True), ("int4", 32, True), ("int4s", 32, True)]


def _scheme(name: str) -> quant.Scheme:
    return quant.scheme(name.rstrip("s") if name == "int4s" else name, 32, int4_symmetric=name == "int4s")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """One compiled expert kernel per layout (d_model 64, d_ff 96: int4 groups of 32 divide both)."""
    root = tmp_path_factory.mktemp("quant")
    built = {}
    for name, tile, dot in LAYOUTS:
        if dot and not BuildTarget.resolve("host").dot_for(_scheme(name).name):
            continue
        s = _scheme(name).tiled(tile, dot, vnni=get_target("host").int8_dot)  # int4 without VNNI: AVX2's dots
        path = root / f"{s.tag}.so"
        build_library(expert_module(64, 96, s, "expert"), get_target("host"), path)
        built[s.tag] = (s, VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu()))
    return built


@pytest.mark.parametrize("name, tile, dot", LAYOUTS, ids=[_scheme(n).tiled(t, d).tag for n, t, d in LAYOUTS])
def test_fused_kernel_matches_numpy_dequantize_then_matmul(kernels, name, tile, dot):
    tag = _scheme(name).tiled(tile, dot).tag
    if tag not in kernels:
        pytest.skip("this CPU has no integer dot products for this precision (int8: AVX512-VNNI; int4: AVX2)")
    s, vm = kernels[tag]
    # Fresh inputs every run; fixed ones for the integer-dot path, whose rounding of the SwiGLU
    # product can land on the other side of a tie from NumPy's (float64 there, float32 here).
    rng = np.random.default_rng(0 if s.dot else None)
    weights = {"w_gate": rng.standard_normal((64, 96), np.float32), "w_up": rng.standard_normal((64, 96), np.float32),
               "w_down": rng.standard_normal((96, 64), np.float32)}
    stored = quant.quantize_expert(weights, s)
    reference_weights = {p: quant.dequantize({k[len(p):]: v for k, v in stored.items() if k == p or k.startswith(p + ".")}, s)
                         for p in weights}
    args = [tvm.runtime.tensor(stored[n]) for n, _, _ in quant.expert_params(64, 96, s)]
    for tokens in (1, 4, 33):
        x = rng.standard_normal((tokens, 64), np.float32)
        ours = vm["expert"](tvm.runtime.tensor(x), *args).numpy()
        ref = _ref_swiglu(x, {k: v.astype(np.float64) for k, v in reference_weights.items()}, s)
        assert relative_error(ours, ref) < 1e-5, (tag, tokens)


@pytest.mark.parametrize("name", ["fp32", "int8", "int4"])
def test_router_kernels_match_numpy(tmp_path, name):
    """Routers at each router precision, built for the CPU: 32 and 64 experts take the GEMV kernel
    (tiled constants), 24 the TE form; softmax, sigmoid (with a bias) and sparsemixer's raw logits
    against NumPy on the dequantized weights, for 1 and 5 tokens."""
    rng = np.random.default_rng(0)
    s = quant.scheme(name, 32)
    routers = [(f"r{e}_{fn}", rng.standard_normal((e, 64), np.float32), bias, fn)
               for e, fn, bias in ((32, "softmax", None), (64, "sigmoid", rng.standard_normal(64, np.float32)),
                                   (24, "sparsemixer", None))]
    path = tmp_path / "routers.so"
    mod = router_module(routers, s, cpu=True)
    build_library(mod, get_target("host"), path)
    kernels = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert {f"{s.tag}t32_matmul_64x32", f"{s.tag}t64_matmul_64x64"} <= kernels, kernels
    vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    for fname, weight, bias, fn in routers:
        w = quant.dequantize(quant.quantize(np.ascontiguousarray(weight.T), s), s).astype(np.float64)
        for tokens in (1, 5):
            x = rng.standard_normal((tokens, 64), np.float32)
            logits = x @ w + (0 if bias is None else bias)
            want = {"softmax": lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True),
                    "sigmoid": lambda z: 1 / (1 + np.exp(-z)), "sparsemixer": lambda z: z}[fn](logits)
            assert relative_error(vm[fname](tvm.runtime.tensor(x)).numpy(), want) < 1e-5, (fname, tokens)


def test_stored_bytes_shrink():
    w = np.random.default_rng(0).standard_normal((128, 256), np.float32)
    sizes = {name: quant.nbytes(quant.quantize(w, quant.scheme(name, 32))) for name in quant.SCHEMES}
    assert sizes["fp32"] == 131072 and sizes["fp16"] == sizes["bf16"] == 65536
    assert sizes["int8"] == 128 * 256 + 256 * 4
    assert sizes["int4"] == 128 * 256 // 2 + (128 // 32) * 256 * 3  # nibbles + fp16 scale + u8 zero
    symmetric = quant.scheme("int4", 32, int4_symmetric=True)
    assert quant.nbytes(quant.quantize(w, symmetric)) == 128 * 256 // 2 + (128 // 32) * 256 * 2  # no zero points
    assert quant.nbytes(quant.quantize(w, symmetric)) * 8 / w.size == 4.5  # q4_0's bits a weight


def test_int4_pack_unpack_round_trip():
    q = np.random.default_rng().integers(0, 16, (64, 7), dtype=np.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (32, 7) and packed.dtype == np.uint8
    assert (quant.unpack_int4(packed) == q).all()
    assert (packed[0] & 0xF == q[0]).all() and (packed[0] >> 4 == q[1]).all()


def test_quantization_error_bounds():
    w = np.random.default_rng(1).standard_normal((128, 64), np.float32)
    # relative half-ulp for the floats (fp16: 11 significant bits, bf16: 8), half a step for the integers
    for name, bound in (("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8), ("int8", 1 / 127 / 2 + 1e-6), ("int4", 1 / 15 / 2 + 1e-3)):
        s = quant.scheme(name, 32)
        err = np.abs(quant.dequantize(quant.quantize(w, s), s) - w)
        span = (np.abs(w).max(0) if name == "int8" else
                (w.reshape(4, 32, 64).max(1) - w.reshape(4, 32, 64).min(1)).repeat(32, 0) if name == "int4" else 1)
        assert (err <= bound * 2 * span + 1e-7).all() if name in ("int8", "int4") else (err <= bound * np.abs(w)).all()
    # Symmetric int4: steps of a group's largest magnitude / 8; half a step, except at the far end
    # of the range, which holds 7 steps, not 8 (the one weight at -8 steps is exact), as in q4_0.
    s = quant.scheme("int4", 32, int4_symmetric=True)
    err = np.abs(quant.dequantize(quant.quantize(w, s), s) - w)
    step = (np.abs(w.reshape(4, 32, 64)).max(1) / 8).repeat(32, 0)
    inner = np.abs(w) <= 7 * step
    assert (err <= step * (1 + 1e-3)).all() and (err[inner] <= step[inner] / 2 * (1 + 1e-3)).all()
    extreme = np.abs(w.reshape(4, 32, 64)).argmax(1)  # each group's largest magnitude is stored exactly
    exact = np.take_along_axis(err.reshape(4, 32, 64), extreme[:, None], 1)
    assert (exact <= np.abs(w).max() * 2.0 ** -11).all()
    q4_0_rms, asymmetric_rms = (np.sqrt(np.mean((quant.dequantize(quant.quantize(w, x), x) - w) ** 2))
                                for x in (s, quant.scheme("int4", 32)))
    assert asymmetric_rms < q4_0_rms < 1.2 * asymmetric_rms


def test_bad_group_sizes_rejected(reference_model, tmp_path):
    with pytest.raises(quant.QuantizationError, match="int4 group size 48 does not divide the input dimension 128"):
        compile_model(reference_model, target="host", out=tmp_path / "x", quant="int4", group_size=48, progress=False)
    with pytest.raises(quant.QuantizationError, match="positive even group size"):
        quant.scheme("int4", 7)
    with pytest.raises(quant.QuantizationError, match="unknown quantization 'int3'"):
        quant.scheme("int3")
    assert not (tmp_path / "x").exists()


# --- accuracy on the shipped model: evaluated on the held-out half not used for calibration ---
def _eval_tokens():
    from moetvm.compiler.models import heldout_split, text_windows

    return text_windows(heldout_split()[1], count=24)


@pytest.fixture(scope="module")
def fp32_reference(reference_model):
    with torch.no_grad():
        return reference_model(torch.from_numpy(_eval_tokens())).numpy()


def _agreement(artifact, fp32_logits):
    from moetvm.runtime import load_model

    model = load_model(artifact)
    ours = model(_eval_tokens())
    return float((ours.argmax(-1) == fp32_logits.argmax(-1)).mean())


@pytest.mark.slow
@pytest.mark.parametrize("scheme, floor", [("int8", 0.99), ("int4", 0.95), ("int4s", 0.95)])
def test_quantized_model_agrees_with_fp32(reference_model, fp32_reference, tmp_path, scheme, floor):
    out = compile_model(reference_model, target="host", out=tmp_path / scheme, quant=scheme.rstrip("s"),
                        int4_symmetric=scheme == "int4s", progress=False)
    agreement = _agreement(out, fp32_reference)
    assert agreement >= floor, agreement
    from moetvm.artifact import read_manifest

    m = read_manifest(out)
    per_expert = m.moe_layers[0].experts[0].weight_bytes
    values = 3 * 128 * 256
    expected = {"int8": values + (256 + 256 + 128) * 4,  # int8 weights + fp32 scale per output channel
                "int4": values // 2 + (2 * (128 // 32) * 256 + (256 // 32) * 128) * 3,  # + fp16 scale, u8 zero per group
                "int4s": values // 2 + (2 * (128 // 32) * 256 + (256 // 32) * 128) * 2}  # fp16 scales alone
    assert per_expert == expected[scheme]
    assert all(w.quant == scheme.rstrip("s") and w.symmetric == (scheme == "int4s") for w in m.workloads)
    assert all(w.quant.startswith("int4g32s") for w in m.weights) if scheme == "int4s" else True


@pytest.mark.slow
def test_int8_router_topk_set_agreement(reference_model, tmp_path):
    """The int8 router picks the same top-k *set* as the fp32 one on held-out inputs."""
    from moetvm.compiler.models import heldout_split, text_windows
    from moetvm.compiler.quant_plan import calibrate
    from moetvm.compiler import find_moe_layers
    from moetvm.routing import select_experts
    from moetvm.runtime import load_model

    out = compile_model(reference_model, target="host", out=tmp_path / "r8", router_quant="int8", progress=False)
    model = load_model(out)
    specs = find_moe_layers(reference_model)
    same = total = 0
    for layer, cal in enumerate(calibrate(reference_model, specs, text_windows(heldout_split()[1], count=16))):
        router = model.manifest.moe_layers[layer].router
        scores = model.router_scores(layer, cal.inputs)
        idx, _ = select_experts(scores, router)
        same += sum(set(a) == set(b) for a, b in zip(idx.tolist(), cal.indices.tolist()))
        total += len(idx)
    assert same / total >= 0.99, same / total


@pytest.mark.slow
def test_auto_plan_respects_budget_and_is_recorded(reference_model, fp32_reference, tmp_path):
    from moetvm.artifact import read_manifest
    from moetvm.compiler.models import calibration_windows

    fp32_bytes = 32 * 3 * 128 * 256 * 4
    out = compile_model(reference_model, target="host", out=tmp_path / "auto", quant="auto", weight_budget="30%",
                        calibration=calibration_windows(), progress=False)
    m = read_manifest(out)
    used = sum(e.weight_bytes for layer in m.moe_layers for e in layer.experts)
    assert used <= 0.30 * fp32_bytes
    plan = m.compile_info["quant"]
    assert plan["scheme"] == "auto" and len(plan["experts"]) == 32 and sum(plan["counts"].values()) == 32
    assert len(plan["counts"]) >= 2  # a real mix of precisions at this budget
    assert _agreement(out, fp32_reference) >= 0.97
    with pytest.raises(quant.QuantizationError, match="below the all-int4 size"):
        compile_model(reference_model, target="host", out=tmp_path / "tiny", quant="auto", weight_budget=1000,
                      calibration=calibration_windows(), progress=False)


def _check_expert_kind(tmp_path, s, kind, make_weights, reference):
    """Build the expert kernel of `kind` at storage `s` (with its fused 2-expert function), store
    two experts of make_weights(rng) (kernel layout) and check both functions against
    reference(x, dequantized float64 weights) within 1e-5 relative."""
    path = tmp_path / "expert.so"
    build_library(expert_module(64, 96, s, "expert", (2,), kind=kind), get_target("host"), path)
    vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    rng = np.random.default_rng(0)
    experts = []
    for _ in range(2):
        stored = quant.quantize_expert(make_weights(rng), s)
        real = {p: quant.dequantize({k[len(p):]: v for k, v in stored.items() if k == p or k.startswith(p + ".")}, s)
                for p in quant.projections(kind)} | {b: stored[b] for b in quant.bias_names(kind)}
        experts.append(([tvm.runtime.tensor(stored[n]) for n, _, _ in quant.expert_params(64, 96, s, kind)],
                        {k: v.astype(np.float64) for k, v in real.items()}))
    x = rng.standard_normal((5, 64), np.float32)
    assert relative_error(vm["expert"](tvm.runtime.tensor(x), *experts[0][0]).numpy(), reference(x, experts[0][1])) < 1e-5
    gates = rng.random((5, 2), np.float32)
    fused = vm[fused_function("expert", 2)](tvm.runtime.tensor(x), tvm.runtime.tensor(gates), *experts[0][0], *experts[1][0]).numpy()
    want = sum(gates[:, i:i + 1] * reference(x, experts[i][1]) for i in range(2))
    assert relative_error(fused, want) < 1e-5


@pytest.mark.parametrize("name, tile", [("fp32", None), ("int8", 32), ("int4", 32), ("int4", None)])
def test_clamped_swiglu_kernel_matches_numpy(tmp_path, name, tile):
    """GPT-OSS's expert kind at each storage: biases, gate clamped above, up clamped both ways,
    (up + 1) * gate * sigmoid(alpha gate); a limit low enough that both clamps bite; the fused
    k-expert function weighs and sums."""
    alpha, limit = 1.702, 0.7
    kind = quant.clamped_kind(alpha, limit)
    assert quant.parse_kind(kind) == (quant.CLAMPED, {"alpha": alpha, "limit": limit})

    def weights(rng):
        return quant.kernel_layout(rng.standard_normal((96, 64), np.float32) * 0.3,
                                   rng.standard_normal((96, 64), np.float32) * 0.3,
                                   rng.standard_normal((64, 96), np.float32) * 0.3,
                                   (rng.standard_normal(96, np.float32), rng.standard_normal(96, np.float32),
                                    rng.standard_normal(64, np.float32)), kind)

    def reference(x, w):
        gate = np.minimum(x @ w["w_gate"] + w["b_gate"], limit)
        up = np.clip(x @ w["w_up"] + w["b_up"], -limit, limit)
        assert (gate == limit).any() and (np.abs(up) == limit).any() and (np.abs(up) < limit).any()
        return ((up + 1) * gate / (1 + np.exp(-alpha * gate))) @ w["w_down"] + w["b_down"]

    _check_expert_kind(tmp_path, quant.scheme(name, 32).tiled(tile), kind, weights, reference)


@pytest.mark.parametrize("name, tile, activation, biases", [
    ("fp32", None, "relu2", False), ("int8", 32, "relu2", False), ("int4", 32, "relu2", True), ("fp16", 32, "gelu", True),
    ("int4", None, "gelutanh", False), ("int8", 32, "relu", True), ("fp32", 32, "silu", False)])
def test_plain_mlp_kernel_matches_numpy(tmp_path, name, tile, activation, biases):
    """A plain (gateless) expert kind at each storage: down(act(x @ up + b_up)) + b_down against
    NumPy on the dequantized weights; the fused k-expert function weighs and sums."""
    kind = quant.plain_kind(activation, biases)
    assert quant.parse_kind(kind) == (quant.PLAIN, {"activation": activation, "biases": biases})
    assert [n for n, _, _ in quant.expert_params(64, 96, quant.scheme("fp32"), kind)] == \
        ["w_up", "w_down"] + (["b_up", "b_down"] if biases else [])

    def weights(rng):
        w = quant.kernel_layout(None, rng.standard_normal((96, 64), np.float32) * 0.3,
                                rng.standard_normal((64, 96), np.float32) * 0.3,
                                (rng.standard_normal(96, np.float32), rng.standard_normal(64, np.float32))
                                if biases else None, kind)
        assert "w_gate" not in w
        return w

    def reference(x, w):
        h = quant.ACTIVATIONS[activation](x @ w["w_up"] + w.get("b_up", 0))
        assert not activation.startswith("relu") or ((h == 0).any() and (h > 0).any())  # the ReLUs cut, not all
        return h @ w["w_down"] + w.get("b_down", 0)

    _check_expert_kind(tmp_path, quant.scheme(name, 32).tiled(tile), kind, weights, reference)


def test_expert_kinds_are_parsed_strictly():
    for bad in ("mlp", "mlp_tanh", "mlp_relu_bias_x", "mlp_relu_biases", "clampedswiglu_a1", "geglu"):
        with pytest.raises(quant.QuantizationError, match="unknown expert"):
            quant.parse_kind(bad)
    with pytest.raises(quant.QuantizationError, match="unknown expert activation"):
        quant.plain_kind("tanh", False)
