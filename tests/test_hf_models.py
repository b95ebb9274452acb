"""Whole Hugging Face transformers MoE models through the compiler and the runtime: the dense
parts traced, every MoE block read by its adapter, experts evicted under a small cache budget."""


import numpy as np
import pytest
import torch

from moetvm.artifact import read_manifest
from moetvm.compiler import compile_model
from moetvm.runtime import load_model

from moetvm.verify import relative_error
from hf_models import FAMILIES, MOE_LAYERS, greedy_ids, tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def compiled(request, tmp_path_factory):
    model = tiny_model(request.param)  # an instantiated transformers model, as users pass it
    out = compile_model(model, target="host", out=tmp_path_factory.mktemp("hf") / request.param,
                        source=f"transformers:{request.param}", progress=False)
    return request.param, model, out


@pytest.mark.slow
def test_family_matches_transformers_with_evicting_cache(compiled):
    family, model, out = compiled
    manifest = read_manifest(out)
    assert manifest.model.name == type(model).__name__
    assert len(manifest.moe_layers) == MOE_LAYERS.get(family, 2) and all(len(layer.experts) == 8 for layer in manifest.moe_layers)
    total = sum(e.weight_bytes for layer in manifest.moe_layers for e in layer.experts + [s.expert for s in layer.shared])
    runtime = load_model(out, cache_budget="30%")
    assert runtime.cache.budget < total

    rng = np.random.default_rng()
    for length in (1, 16):
        tokens = rng.integers(0, 128, size=(2, length))
        with torch.no_grad():
            theirs = model(torch.from_numpy(tokens)).logits.numpy()
        ours = runtime(tokens)
        assert ours.shape == theirs.shape
        assert relative_error(ours, theirs) < 1e-4, family

    prompt = torch.from_numpy(rng.integers(0, 128, size=(1, 5)))
    assert runtime.generate(prompt[0].numpy(), 16) == greedy_ids(model, prompt, 16)
    assert runtime.stats()["evictions"] > 0
    if family == "olmoe":  # compiled from a module, not a directory: no tokenizer, so text is refused up front
        import subprocess
        import sys

        as_text = subprocess.run([sys.executable, "-m", "moetvm.cli", "run", out, "--prompt", "hello"],
                                 capture_output=True, text=True, timeout=600)
        assert as_text.returncode == 1 and "Traceback" not in as_text.stderr
        assert "ships no tokenizer" in as_text.stderr and len(as_text.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("family, window, mixed", [("mixtral", 4, False), ("olmoe", None, False),
                                                  ("cohere2_moe", 4, True)])
def test_attention_window_follows_transformers_masks(family, window, mixed):
    """Mixtral windows every layer, Cohere2-MoE windows 3 layers in 4, and OLMoE carries a
    `sliding_window` it never applies: the wrapper's masks reproduce each on 12 tokens."""
    import transformers

    from moetvm.compiler.models.hf import HFCausalLM

    config_class, model_class = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                                 "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
                                 "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM")}[family]
    config = getattr(transformers, config_class)(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                                                 num_attention_heads=4, num_key_value_heads=4, sliding_window=4)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    wrapped = HFCausalLM(model)
    assert (wrapped.window, wrapped.mixed_attention) == (window, mixed)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(wrapped(tokens), model(tokens).logits, rtol=1e-5, atol=1e-6)


def test_complex_rotary_is_rewritten_to_real_arithmetic(tmp_path):
    """DeepSeek-V2 / Llama4-style rotary embeddings in complex numbers, which TVM's importer
    rejects, import after the rewrite and compute the same values (symbolic batch and length)."""
    import tvm
    from torch.export import Dim
    from tvm.runtime.vm import VirtualMachine

    from moetvm.compiler import frontend
    from moetvm.compiler.lowering import build_library
    from moetvm.targets import get_target

    class ComplexRotary(torch.nn.Module):
        def forward(self, x, positions):
            freqs = positions[..., None].float() * torch.linspace(0.05, 1.0, x.shape[-1] // 2)
            cis = torch.polar(torch.ones_like(freqs), freqs) * 1.5
            z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(z * cis.unsqueeze(1)).flatten(3)

    x, positions = torch.randn(2, 3, 5, 8), torch.arange(5).expand(2, 5)
    batch, seq = Dim("batch", max=8), Dim("seq", min=1, max=64)
    mod = frontend._import(ComplexRotary(), (x, positions), ({0: batch, 2: seq}, {0: batch, 1: seq}))
    build_library(mod, get_target("host"), tmp_path / "rotary.so")
    vm = VirtualMachine(tvm.runtime.load_module(str(tmp_path / "rotary.so")), tvm.cpu())
    for batch, length in ((2, 5), (1, 9)):
        x, positions = torch.randn(batch, 3, length, 8), torch.arange(3, 3 + length).expand(batch, length)
        ours = vm["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(positions.numpy())).numpy()
        assert relative_error(ours, ComplexRotary()(x, positions).numpy()) < 1e-6


def test_phimoe_longrope_switches_scale_where_transformers_does(tmp_path):
    """Phi-3.5-MoE's LongRoPE: the cos/sin scale is chosen by the sequence's length (a Python
    branch in transformers, a `where` once traced). Prompts on both sides of the switch match
    transformers' forward, and cached decode steps across it match transformers' cached steps."""
    import copy

    from transformers import DynamicCache

    from hf_models import tiny_model

    half = 16 // 2  # head_dim 16
    rope = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)], "original_max_position_embeddings": 32,
            "short_mscale": 1.0, "long_mscale": 1.3}
    model = tiny_model("phimoe", rope_parameters=rope)
    reference = copy.deepcopy(model)  # the compile wraps the model it is given
    runtime = load_model(compile_model(model, target="host", out=tmp_path / "a", progress=False))
    rng = np.random.default_rng(0)
    for length in (16, 40):
        tokens = rng.integers(0, 128, size=(2, length))
        with torch.no_grad():
            theirs = reference(torch.from_numpy(tokens)).logits.numpy()
        assert relative_error(runtime(tokens), theirs) < 1e-4, length
    tokens = rng.integers(0, 128, size=36)
    cache, ours = DynamicCache(config=reference.config), runtime.new_cache()
    for start, stop in [(0, 20)] + [(i, i + 1) for i in range(20, 36)]:  # steps through positions 31 -> 32
        with torch.no_grad():
            theirs = reference(torch.from_numpy(tokens[None, start:stop]), past_key_values=cache, use_cache=True,
                               position_ids=torch.arange(start, stop)[None]).logits.numpy()
        logits, ours = runtime.step(tokens[None, start:stop], ours)
        assert relative_error(logits, theirs) < 1e-4, start


@pytest.mark.parametrize("family, full_layers, bound", [
    ("mixtral", [], ("window", 8)), ("gpt_oss", [1], ("window", 8)), ("llama4_text", [1], ("chunk", 4))])
def test_bounded_layers_keep_only_what_they_attend_to(family, full_layers, bound, tmp_path):
    """A window of 8 positions on every layer (Mixtral) or on GPT-OSS's sliding layers beside a
    full one (and sinks); Llama 4's chunks of 4 beside a full layer. Over 32 tokens, 4x the
    window, fed a few at a time, a windowed layer holds no more than the 7 past positions the next
    token can attend to, a chunked one only its current chunk's, a full one every position; every
    step's logits match transformers' forward over the whole sequence."""
    model = tiny_model(family)
    out = compile_model(model, target="host", out=tmp_path / "a", progress=False)
    kv = read_manifest(out).model.kv
    kind, size = bound
    assert getattr(kv, kind) == size and kv.full_layers == full_layers
    expected = (lambda n: min(n, size - 1)) if kind == "window" else (lambda n: n % size)
    runtime = load_model(out)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 32))
    cache = runtime.new_cache(2)
    for start, stop in [(0, 5), (5, 12), *((i, i + 1) for i in range(12, 32))]:
        logits, cache = runtime.step(tokens[:, start:stop], cache)
        held = [k.shape[2] for k in cache.keys]
        assert [v.shape[2] for v in cache.values] == held
        assert held == [stop if i in full_layers else expected(stop) for i in range(len(held))], stop
        with torch.no_grad():
            theirs = model(torch.from_numpy(tokens[:, :stop])).logits[:, start:stop].numpy()
        assert relative_error(logits, theirs) < 1e-4, (start, stop)
    assert cache.length == 32


@pytest.mark.parametrize("family, states", [
    ("lfm2_moe", [("conv", 0, [2, 64])]),  # kernel 3: the last 2 inputs
    ("granitemoehybrid", [("conv", 0, [3, 192]), ("ssm", 0, [4, 32, 16])]),  # x, B, C convolved; heads, head dim, state
    ("qwen3_next", [("conv", 0, [3, 160]), ("delta", 0, [4, 24, 16])]),  # q, k, v convolved; value heads, value dim, key dim
])
def test_layer_states_are_carried_between_steps(family, states, tmp_path):
    """A convolution layer (LFM2), a Mamba2 mixer (Granite-4.0-H) or a gated delta net
    (Qwen3-Next) carries fixed-size states between steps, buffers the runtime holds like the KV
    cache: fed in chunks of 5, 1, 6 and then one token at a time (shorter and longer than the
    kernel and the scan's chunk of 8), every step's logits match transformers' forward over the
    whole sequence and no state buffer changes shape. Each state matters: one zeroed between
    steps changes the next logits."""
    model = tiny_model(family)
    out = compile_model(model, target="host", out=tmp_path / "a", progress=False)
    kv = read_manifest(out).model.kv
    assert kv.layout == "in_place" and [(s.kind, s.layer, s.shape) for s in kv.states] == states
    runtime = load_model(out)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 20))
    cache, shapes = runtime.new_cache(2), set()
    for start, stop in [(0, 5), (5, 6), (6, 12), *((i, i + 1) for i in range(12, 20))]:
        logits, cache = runtime.step(tokens[:, start:stop], cache)
        shapes.add(tuple(tuple(state.shape) for state in cache.states))
        with torch.no_grad():
            theirs = model(torch.from_numpy(tokens[:, :stop])).logits[:, start:stop].numpy()
        assert relative_error(logits, theirs) < 1e-4, (start, stop)
    assert shapes == {tuple((2, *shape) for _, _, shape in states)} and cache.length == 20
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.concatenate([tokens, tokens[:, 19:20]], 1))).logits[:, -1:].numpy()
    kept = [state.numpy() for state in cache.states]
    for i in range(len(kept)):  # each step rewrites every state: all are put back before the next
        for state, value in zip(cache.states, kept):
            state.copyfrom(np.zeros_like(value) if state is cache.states[i] else value)
        cache.length = 20
        logits, _ = runtime.step(tokens[:, 19:20], cache)
        assert relative_error(logits, theirs) > 1e-3, i
    for state, value in zip(cache.states, kept):
        state.copyfrom(value)
    cache.length = 20
    assert relative_error(runtime.step(tokens[:, 19:20], cache)[0], theirs) < 1e-4


def test_int8_kv_cache_is_refused_for_a_concatenating_cache(tmp_path):
    """A windowed model keeps the float32 concatenating cache: --kv-dtype int8 is refused by name,
    before any trace, and nothing is written."""
    from hf_models import tiny_model

    from moetvm.compiler.spec import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="--kv-dtype int8: MixtralForCausalLM keeps the concatenating"):
        compile_model(tiny_model("mixtral"), target="host", out=tmp_path / "a", kv_dtype="int8", progress=False)
    assert not (tmp_path / "a").exists()


def test_llama4_chunked_masks_follow_transformers():
    """Llama 4's chunked layers (chunks of 4) beside full ones: the wrapper's masks reproduce
    transformers' own on 13 tokens, and full causal masks would not."""
    from hf_models import tiny_model

    from moetvm.compiler.models.hf import HFCausalLM

    model = tiny_model("llama4_text")
    wrapped = HFCausalLM(model)
    assert wrapped.chunk == 4 and not wrapped.in_place_kv
    tokens = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        assert torch.allclose(wrapped(tokens), model(tokens).logits, rtol=1e-5, atol=1e-6)
        wrapped.chunk = 1 << 20  # one chunk: full causal masks, which must not match
        assert not torch.allclose(wrapped(tokens), model(tokens).logits, rtol=1e-5, atol=1e-6)

