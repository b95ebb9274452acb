"""The spine: runtime output equals PyTorch's, with and without cache pressure."""

import numpy as np
import pytest
import torch

from moetvm.runtime import load_model

from moetvm.verify import relative_error
from hf_models import greedy_ids

TOLERANCE = 1e-4  # fp32 end to end: observed ~5e-7


@pytest.fixture(scope="module")
def one_expert_budget(reference_artifact):
    from moetvm.artifact import read_manifest

    return read_manifest(reference_artifact).moe_layers[0].experts[0].weight_bytes


@pytest.mark.parametrize("budget", ["100%", "one-expert"])
@pytest.mark.parametrize("length", [1, 7, 64])
def test_logits_match_pytorch(reference_artifact, reference_model, heldout_tokens, one_expert_budget, budget, length):
    model = load_model(reference_artifact, cache_budget=one_expert_budget if budget == "one-expert" else budget)
    tokens = heldout_tokens[1000 : 1000 + length][None]
    ours = model(tokens)
    with torch.no_grad():
        theirs = reference_model(torch.from_numpy(tokens)).numpy()
    assert ours.shape == theirs.shape == (1, length, 256)
    assert relative_error(ours, theirs) < TOLERANCE
    stats = model.stats()
    if budget == "one-expert":
        assert stats["resident_expert_bytes"] <= one_expert_budget
        if length > 1:  # several experts per layer: every layer must evict
            assert stats["evictions"] >= len(model.manifest.moe_layers)


def test_batched_prompts_match(reference_artifact, reference_model, heldout_tokens):
    model = load_model(reference_artifact, cache_budget="50%")
    tokens = heldout_tokens[:60].reshape(3, 20)
    with torch.no_grad():
        theirs = reference_model(torch.from_numpy(tokens)).numpy()
    assert relative_error(model(tokens), theirs) < TOLERANCE


def test_each_moe_layer_matches_on_fresh_random_inputs(reference_artifact, reference_model):
    model = load_model(reference_artifact, cache_budget="25%")
    rng = np.random.default_rng()
    for index, block in enumerate(reference_model.blocks):
        for tokens in (1, 5, 33):
            x = rng.standard_normal((tokens, 128)).astype(np.float32)
            with torch.no_grad():
                theirs = block.moe(torch.from_numpy(x)).numpy()
            assert relative_error(model.moe_layer(index, x), theirs) < TOLERANCE, (index, tokens)


def test_greedy_generation_matches_pytorch(reference_artifact, reference_model, heldout_tokens):
    model = load_model(reference_artifact, cache_budget="25%", prefetch=False, preload=0)  # plain LRU accounting
    prompt = heldout_tokens[2000:2016]
    assert model.generate(prompt, 32) == greedy_ids(reference_model, prompt, 32)
    stats = model.stats()
    assert stats["decode_tokens"] == 31 and stats["latency_ms"]["p50"] > 0
    assert 0 < stats["hit_rate"] < 1 and stats["expert_loads"] == stats["misses"]


def test_kv_cache_step_equals_full_recompute(reference_artifact, heldout_tokens):
    """Decoding with the KV cache must give the logits of running the whole sequence."""
    model = load_model(reference_artifact)
    seq = heldout_tokens[300:340][None]
    full = model(seq)
    logits, cache = model.step(seq[:, :30], model.new_cache())
    for t in range(30, 40):
        logits, cache = model.step(seq[:, t : t + 1], cache)
        assert relative_error(logits[:, 0], full[:, t]) < TOLERANCE
