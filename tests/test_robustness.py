"""Graceful fallback when experts fail, many threads on one model, and storage faults."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.runtime import InputError, load_model
from moetvm.verify import relative_error


@pytest.fixture
def artifact_copy(reference_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(reference_artifact, dst)
    return dst


def _torch_moe_without(block, x: np.ndarray, dropped: int) -> np.ndarray:
    """PyTorch reference for `skip`: route as usual, remove the failed expert from each token's
    choice, renormalise the remaining weights, sum."""
    with torch.no_grad():
        xt = torch.from_numpy(x)
        _, weights, indices = block.route(xt)
        keep = indices != dropped
        w = torch.where(keep, weights, torch.zeros_like(weights))
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        out = torch.zeros_like(xt)
        for slot in range(indices.shape[1]):
            for e in indices[:, slot].unique().tolist():
                rows = (indices[:, slot] == e) & keep[:, slot]
                if rows.any():
                    out[rows] += block.experts[e](xt[rows]) * w[rows, slot, None]
        return out.numpy()


def test_error_policy_raises_never_wrong(artifact_copy):
    model = load_model(artifact_copy, cache_budget="13%", prefetch=False, preload=0)  # nothing loaded before the unlink
    (artifact_copy / "experts" / "layer2" / "expert5.safetensors").unlink()
    x = np.random.default_rng(0).standard_normal((200, 128)).astype(np.float32)
    with pytest.raises(ArtifactError, match=r"experts/layer2/expert5\.safetensors: missing"):
        model.moe_layer(2, x)


def test_skip_policy_equals_reference_without_the_failed_expert(artifact_copy, reference_model):
    model = load_model(artifact_copy, cache_budget="13%", fallback="skip")
    path = artifact_copy / "experts" / "layer1" / "expert3.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # damaged after load: caught when fetched
    x = np.random.default_rng().standard_normal((300, 128)).astype(np.float32)
    ours = model.moe_layer(1, x)
    theirs = _torch_moe_without(reference_model.blocks[1].moe, x, dropped=3)
    assert relative_error(ours, theirs) < 1e-5
    stats = model.stats()
    assert stats["fallbacks"]["skip"] > 0 and "expert3" in model.fallback_errors[0]


def test_dense_policy_uses_the_compiled_mean_expert(reference_model, tmp_path):
    from moetvm.compiler import compile_model

    artifact_copy = compile_model(reference_model, target="host", out=tmp_path / "dense", dense_fallback=True,
                                  progress=False)
    model = load_model(artifact_copy, cache_budget="13%", fallback="dense")
    (artifact_copy / "experts" / "layer0" / "expert1.safetensors").unlink()
    x = np.random.default_rng(1).standard_normal((120, 128)).astype(np.float32)
    ours = model.moe_layer(0, x)
    block = reference_model.blocks[0].moe
    with torch.no_grad():
        xt = torch.from_numpy(x)
        _, weights, indices = block.route(xt)
        mean = {n: torch.stack([getattr(e, n).weight for e in block.experts]).mean(0) for n in ("w_gate", "w_up", "w_down")}

        def run(e, rows):
            if e == 1:
                g = rows @ mean["w_gate"].T
                return (torch.nn.functional.silu(g) * (rows @ mean["w_up"].T)) @ mean["w_down"].T
            return block.experts[e](rows)

        theirs = torch.zeros_like(xt)
        for slot in range(indices.shape[1]):
            for e in indices[:, slot].unique().tolist():
                rows = indices[:, slot] == e
                theirs[rows] += run(e, xt[rows]) * weights[rows, slot, None]
    assert relative_error(ours, theirs.numpy()) < 1e-5
    assert model.stats()["fallbacks"]["dense"] > 0
    assert read_manifest(artifact_copy).moe_layers[0].fallback is not None


def test_many_threads_one_model(reference_artifact, heldout_tokens):
    """8 threads x mixed-length inferences on one model whose budget forces evictions, with
    prefetch on: every output equals the single-threaded one; the budget is never exceeded."""
    rng = np.random.default_rng(7)
    jobs = [heldout_tokens[s : s + n][None] for s, n in zip(rng.integers(0, 40000, 48), rng.integers(1, 40, 48))]
    # The same budget single-threaded: the same kernels (a full budget would take the resident
    # layers, whose fused kernel sums in another order), so outputs must be bit for bit the same.
    single = load_model(reference_artifact, cache_budget="19%", prefetch=False)
    expected = [single(t) for t in jobs]
    shared = load_model(reference_artifact, cache_budget="19%", prefetch=True)
    results, errors = [None] * len(jobs), []

    def worker(k):
        try:
            for i in range(k, len(jobs), 8):
                results[i] = shared(jobs[i])
                assert shared.cache.stats.resident_bytes <= shared.cache.budget
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    for ours, theirs in zip(results, expected):
        np.testing.assert_array_equal(ours, theirs)
    s = shared.cache.stats
    assert s.evictions > 0 and s.prefetch_requests > 0 and s.peak_resident_bytes <= shared.cache.budget
    assert s.prefetch_failed == 0, shared.cache.errors


def test_slow_and_failing_storage_mid_run(reference_artifact, heldout_tokens):
    """Storage that stalls and then fails: no deadlock, errors name the expert, and outputs
    are either right or absent."""
    model = load_model(reference_artifact, cache_budget="25%", prefetch=True)
    real = model.cache.loader
    calls = {"n": 0}
    lock = threading.Lock()

    def faulty(key):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        time.sleep(0.002 * (n % 3))  # jittery latency
        prefetching = threading.current_thread().name == "moetvm-loader"
        # A bad patch of storage mid-run, on both the demand and the prefetch path; then it recovers.
        if 60 < n < 200 and n % (3 if prefetching else 5) == 0:
            raise OSError(f"injected EIO reading expert {key}")
        return real(key)

    model.cache.loader = faulty
    reference = load_model(reference_artifact)
    outcomes = {"ok": 0, "error": 0}
    for start in range(0, 2000, 100):
        tokens = heldout_tokens[start : start + 20][None]
        try:
            out = model(tokens)
        except OSError as e:
            assert "injected EIO reading expert" in str(e)
            outcomes["error"] += 1
            continue
        np.testing.assert_array_equal(out, reference(tokens))
        outcomes["ok"] += 1
    model.cache.drain()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
    assert model.cache.stats.resident_bytes <= model.cache.budget


def test_dense_policy_without_a_fallback_expert_is_a_clear_error(artifact_copy):
    with pytest.raises(InputError, match="fallback 'dense' needs the dense stand-in experts"):
        load_model(artifact_copy, cache_budget="13%", fallback="dense")  # refused at start, not mid-run


def test_new_version_reuses_unchanged_experts(reference_artifact, tmp_path, heldout_tokens):
    """An update that changes one expert: `moetvm diff` names only it, and a running model
    picks up the new version keeping every unchanged expert it already had loaded."""
    import json
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    from moetvm.artifact import sha256_file

    new = tmp_path / "v2"
    shutil.copytree(reference_artifact, new)
    data = json.loads((new / "manifest.json").read_text())
    entry = data["moe_layers"][2]["experts"][6]["file"]
    path = new / entry["path"]
    save_file({k: (v * 0.9).astype(np.float32) for k, v in load_file(str(path)).items()}, str(path))
    entry.update(size=path.stat().st_size, sha256=sha256_file(path))
    (new / "manifest.json").write_text(json.dumps(data))

    out = subprocess.run([sys.executable, "-m", "moetvm.cli", "diff", str(reference_artifact), str(new), "--json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert "experts/layer2/expert6.safetensors" in json.dumps(d)
    old_model = load_model(reference_artifact, cache_budget="100%", prefetch=False, preload=0)
    tokens = heldout_tokens[:64][None]
    old_model(tokens)
    resident = len(old_model.cache.keys())
    new_model = load_model(new, cache_budget="100%", prefetch=False, preload=0)
    adopted = new_model.adopt_experts(old_model)
    assert adopted == resident - (1 if (2, 6) in old_model.cache else 0)
    assert (2, 6) not in new_model.cache
    fresh = load_model(new, cache_budget="100%")
    np.testing.assert_array_equal(new_model(tokens), fresh(tokens))
    assert new_model.cache.stats.loads == int((2, 6) in old_model.cache.keys() or (2, 6) in new_model.cache.keys())
