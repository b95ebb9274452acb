"""The expert cache and the routing functions, on hand-worked cases and against PyTorch."""

import random
import threading

import numpy as np
import pytest
import torch

from moetvm.artifact import Router
from moetvm.runtime.cache import ExpertCache, parse_budget
from moetvm.routing import group_by_expert, select_experts


def make_cache(budget, sizes):
    loaded = []

    def loader(key):
        loaded.append(key)
        return f"weights-{key}", sizes[key]

    return ExpertCache(budget, loader), loaded


def test_lru_hand_worked():
    cache, loaded = make_cache(30, {k: 10 for k in "ABCD"})
    for key in "ABCABDAC":
        assert cache.get(key) == f"weights-{key}"
    # A B C miss; A B hit; D miss evicts C (LRU); A hit; C miss evicts B.
    assert loaded == list("ABCDC")
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (3, 5, 2)
    assert cache.keys() == ["D", "A", "C"] and s.resident_bytes == 30


def test_mixed_sizes_evict_until_fit():
    cache, _ = make_cache(25, {"big": 20, "a": 5, "b": 5})
    cache.get("a"), cache.get("b"), cache.get("big")
    assert cache.keys() == ["big", "b"] or cache.keys() == ["b", "big"]
    assert cache.stats.resident_bytes <= 25
    with pytest.raises(ValueError, match="more than the whole cache budget"):
        make_cache(10, {"big": 20})[0].get("big")


@pytest.mark.parametrize("text, expected", [("25%", 250), (0.5, 500), (123, 123), ("2KB", 2000), ("1KiB", 1024), ("1.5MB", 1_500_000)])
def test_budget_parsing(text, expected):
    assert parse_budget(text, 1000) == expected


def test_a_whole_percentage_is_every_byte():
    assert parse_budget("100%", 116736) == 116736  # float arithmetic gave 116735: one expert short
    assert parse_budget("33%", 300) == 99


def test_budget_never_exceeded_under_threads():
    sizes = {k: random.Random(k).randint(1, 10) for k in range(40)}
    cache, _ = make_cache(25, sizes)
    over = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(2000):
            cache.get(rng.randrange(40))
            if cache.stats.resident_bytes > 25:
                over.append(cache.stats.resident_bytes)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats
    assert not over and s.hits + s.misses == 16000 and s.loads == s.misses
    assert s.resident_bytes == sum(sizes[k] for k in cache.keys())


def router(**kw):
    base = dict(library="r", function="f", n_experts=8, top_k=2, score_fn="softmax", normalize=True)
    return Router(**{**base, **kw})


def test_softmax_topk_matches_torch():
    logits = torch.randn(50, 8)
    probs = logits.softmax(-1)
    w, i = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    idx, weights = select_experts(probs.numpy(), router())
    assert (np.sort(idx, 1) == np.sort(i.numpy(), 1)).all()
    np.testing.assert_allclose(np.sort(weights, 1), np.sort(w.numpy(), 1), rtol=1e-6)


def test_grouped_topk_with_bias_and_scaling_matches_deepseek_v3_rule():
    """DeepSeek-V3: sigmoid scores + selection bias; group score = sum of top-2 in the group;
    keep the best groups; pick top-k inside; weights from unbiased scores, renormalised, scaled."""
    torch.manual_seed(0)
    n, groups, top_groups, k, scale = 8, 4, 2, 3, 2.5
    scores = torch.rand(64, n)
    bias = torch.randn(n) * 0.1
    choice = scores + bias
    g = choice.view(64, groups, -1).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(g).scatter_(1, g.topk(top_groups, -1).indices, 1)
    masked = choice.masked_fill(~keep.repeat_interleave(n // groups, 1).bool(), float("-inf"))
    ref_idx = masked.topk(k, -1).indices
    ref_w = scores.gather(1, ref_idx)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True) * scale
    r = router(n_experts=n, top_k=k, score_fn="sigmoid", n_groups=groups, top_groups=top_groups,
               scaling=scale, selection_bias=bias.tolist())
    idx, w = select_experts(scores.numpy(), r)
    order, ref_order = np.argsort(idx, 1), np.argsort(ref_idx.numpy(), 1)
    assert (np.take_along_axis(idx, order, 1) == np.take_along_axis(ref_idx.numpy(), ref_order, 1)).all()
    np.testing.assert_allclose(np.take_along_axis(w, order, 1), np.take_along_axis(ref_w.numpy(), ref_order, 1), rtol=1e-5)


@pytest.mark.parametrize("jitter_eps", [0.0, 0.01, 0.2, 0.9])
def test_sparsemixer_matches_transformers(jitter_eps):
    """PhiMoE's routing at inference, transformers' own function: logits with negative maxima,
    exact ties and near ties (where the jitter mask decides what each pick's softmax sees)."""
    sparsemixer = pytest.importorskip("transformers.models.phimoe.modeling_phimoe").sparsemixer
    torch.manual_seed(0)
    logits = torch.randn(256, 8) * torch.tensor([0.01, 1.0, 4.0]).repeat(86)[:256, None]
    logits[:16] -= 5  # every logit negative
    logits[16:32, 3] = logits[16:32, 5]  # tied picks
    logits[32:48] = logits[32:48, :1] * (1 + 1e-3 * torch.randn(16, 8))  # near ties everywhere
    want_w, want_i = sparsemixer(logits, jitter_eps=jitter_eps, training=False)
    idx, w = select_experts(logits.numpy(), router(top_k=2, score_fn="sparsemixer", normalize=False,
                                                   jitter_eps=jitter_eps))
    assert (idx == want_i.numpy()).all()
    np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-5)


def test_group_by_expert_covers_every_assignment_once():
    idx = np.array([[0, 3], [3, 1], [0, 1], [2, 0]])
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    seen = {}
    for expert, rows, weights in group_by_expert(idx, w):
        for r, wt in zip(rows, weights):
            seen[(int(r), expert)] = float(wt)
    assert seen == {(t, int(idx[t, j])): float(w[t, j]) for t in range(4) for j in range(2)}
    assert [e for e, _, _ in group_by_expert(idx, w)] == [0, 1, 2, 3]


def test_skip_light_experts_drops_below_the_share_and_renormalises():
    from moetvm.routing import SKIPPED, skip_light_experts

    indices = np.array([[3, 1, 7, 0], [2, 5, 6, 4], [1, 2, 3, 4]])
    weights = np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.1, 0.1], [2.0, 0.2, 0.1, 0.1]], np.float32)  # row 3: scaled
    got_i, got_w = skip_light_experts(indices, weights, 0.2)
    assert got_i.tolist() == [[3, 1, SKIPPED, SKIPPED], [2, 5, 6, 4], [1, SKIPPED, SKIPPED, SKIPPED]]
    np.testing.assert_allclose(got_w, [[0.625, 0.375, 0, 0], [0.1, 0.1, 0.1, 0.1], [2.4, 0, 0, 0]], rtol=1e-6)
    # Above every share the heaviest stays; 0 changes nothing.
    assert skip_light_experts(indices, weights, 0.99)[0].tolist() == [[3] + [SKIPPED] * 3, [2] + [SKIPPED] * 3,
                                                                      [1] + [SKIPPED] * 3]
    same_i, same_w = skip_light_experts(indices, weights, 0.0)
    assert np.array_equal(same_i, indices) and np.array_equal(same_w, weights)
    assert [e for e, _, _ in group_by_expert(got_i, got_w)] == [1, 2, 3, 4, 5, 6]  # skipped slots never run


def test_skipping_at_zero_is_no_skipping_and_above_saves_loads(reference_artifact, heldout_tokens):
    from moetvm.errors import MoetvmError
    from moetvm.runtime import load_model

    tokens = heldout_tokens[4000:4032][None]
    plain, zero = load_model(reference_artifact, cache_budget="25%"), load_model(reference_artifact, cache_budget="25%",
                                                                                   min_expert_weight=0.0)
    assert np.array_equal(plain(tokens), zero(tokens))
    assert plain.generate(tokens[0, :8], 32) == zero.generate(tokens[0, :8], 32)
    assert zero.stats()["skipped_experts"] == 0
    skipping = load_model(reference_artifact, cache_budget="25%", min_expert_weight=0.3)
    fresh = load_model(reference_artifact, cache_budget="25%")
    a, b = fresh.generate(tokens[0, :8], 64, ignore_eos=True), skipping.generate(tokens[0, :8], 64, ignore_eos=True)
    assert skipping.stats()["skipped_experts"] > 0
    assert skipping.stats()["expert_loads"] < fresh.stats()["expert_loads"]
    logits, reference = skipping(tokens), plain(tokens)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.8 and not np.array_equal(logits, reference)
    assert len(a) == len(b) == 64
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(MoetvmError, match="min expert weight is a share"):
            load_model(reference_artifact, min_expert_weight=bad)
