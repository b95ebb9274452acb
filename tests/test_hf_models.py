"""Whole Hugging Face transformers MoE models through the compiler and the runtime: the dense
parts traced, every MoE block read by its adapter, experts evicted under a small cache budget."""

import numpy as np
import pytest
import torch

from moetvm.artifact import read_manifest
from moetvm.compiler import compile_model
from moetvm.runtime import load_model

from conftest import relative_error
from hf_models import FAMILIES, tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def compiled(request, tmp_path_factory):
    from moetvm.compiler.hf import HFCausalLM

    model = tiny_model(request.param)
    out = compile_model(HFCausalLM(model), target="host", out=tmp_path_factory.mktemp("hf") / request.param,
                        source=f"transformers:{request.param}", progress=False)
    return request.param, model, out


def _greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """transformers' own forward over the whole sequence at every step: no cache to share bugs with."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, prompt.shape[1]:].tolist()


@pytest.mark.slow
def test_family_matches_transformers_with_evicting_cache(compiled):
    family, model, out = compiled
    manifest = read_manifest(out)
    assert len(manifest.moe_layers) == 2 and all(len(layer.experts) == 8 for layer in manifest.moe_layers)
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
    assert runtime.generate(prompt[0].numpy(), 16) == _greedy(model, prompt, 16)
    assert runtime.stats()["evictions"] > 0
