"""Fixed-pattern routing (hash, tiling, cycle), masking and pruning."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.compiler import compile_model
from moetvm.compiler.models import calibration_windows
from moetvm.routing import allowed_experts
from moetvm.runtime import load_model
from moetvm.runtime.simulator import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, reference_model):
    root = tmp_path_factory.mktemp("routing")
    return {mode: compile_model(reference_model, target="host", out=root / mode, routing=mode, tile=8,
                                cycle_dwell=4, calibration=calibration_windows(), progress=False)
            for mode in ("hash", "tiling", "cycle")}


def _decode_trace(model, tokens, drain=False):
    model.start_trace()
    cache = model.new_cache()
    logits = []
    for t in tokens:
        out, cache = model.step(np.array([[t]], dtype=np.int64), cache)
        logits.append(out[0, -1])
        if drain:
            model.cache.drain()  # let each step's prefetches land: a deterministic schedule
    return np.stack(logits), model.stop_trace()


@pytest.mark.parametrize("mode", ["hash", "tiling", "cycle"])
def test_fixed_routing_follows_its_definition_and_is_deterministic(fixed, heldout_tokens, mode):
    tokens = heldout_tokens[3000:3040]
    a, trace = _decode_trace(load_model(fixed[mode], cache_budget="25%"), tokens)
    b, _ = _decode_trace(load_model(fixed[mode], cache_budget="100%"), tokens)
    assert np.array_equal(a, b)
    manifest = read_manifest(fixed[mode])
    assert "routers" not in {lib.name for lib in manifest.libraries}  # no router runs at all
    for position, step in enumerate(trace.steps):
        for layer, routing in step.items():
            r = manifest.moe_layers[layer].router
            assert r.mode == mode
            k = r.top_k
            if mode == "hash":
                expected = r.table[tokens[position]]
            elif mode == "tiling":
                allowed = allowed_experts(r)
                expected = [allowed[(position // r.tile * k + j) % len(allowed)] for j in range(k)]
            else:
                expected = r.cycle[position % len(r.cycle)]
            assert sorted(routing.indices[0].tolist()) == sorted(expected)
            assert np.allclose(routing.weights, 1 / k)


def test_hash_table_fitted_to_the_learned_router(fixed, reference_model):
    """Tokens keep the experts the learned router chose most often for them."""
    from moetvm.compiler.quant_plan import calibrate
    from moetvm.compiler import find_moe_layers

    windows = calibration_windows()
    cal = calibrate(reference_model, find_moe_layers(reference_model), windows)
    table = read_manifest(fixed["hash"]).moe_layers[0].router.table
    tokens = windows.ravel()
    token = int(np.bincount(tokens).argmax())  # the most frequent byte
    picks = np.bincount(cal[0].indices[tokens == token].ravel(), minlength=8)
    assert sorted(table[token]) == sorted(np.argsort(-picks, kind="stable")[:2].tolist())


@pytest.mark.parametrize("mode, budget", [("tiling", "40%"), ("cycle", "50%")])
def test_exact_prefetch_reaches_belady(fixed, heldout_tokens, mode, budget):
    """With a known future the runtime evicts by next use and prefetches exactly: its expert
    loads equal Belady's MIN misses on the same trace (and beat LRU's)."""
    model = load_model(fixed[mode], cache_budget=budget, prefetch=True, preload=0)  # prefetch alone
    _, trace = _decode_trace(model, heldout_tokens[4000:4200], drain=True)
    sim = simulate(trace, model.cache.budget, policies=("lru", "belady"))
    s = model.cache.stats
    assert s.loads == sim["belady"]["misses"] and sim["belady"]["exact"]
    assert s.loads < sim["lru"]["misses"]
    assert s.misses < s.loads  # most of those loads were prefetched, off the critical path


def test_masked_experts_pruned_and_never_selected(reference_model, reference_artifact, heldout_tokens, tmp_path):
    out = compile_model(reference_model, target="host", out=tmp_path / "masked", mask_below=0.08,
                        calibration=calibration_windows(), progress=False)
    manifest = read_manifest(out)
    masked = {layer.layer: set(layer.router.masked) for layer in manifest.moe_layers}
    assert sum(map(len, masked.values())) > 0
    for layer in manifest.moe_layers:
        present = {e.index for e in layer.experts}
        assert present.isdisjoint(masked[layer.layer]) and len(present) + len(masked[layer.layer]) == 8
        for e in masked[layer.layer]:
            assert not (out / "experts" / f"layer{layer.layer}" / f"expert{e}.safetensors").exists()
    model = load_model(out, cache_budget="100%")
    model.start_trace()
    model(heldout_tokens[:512].reshape(4, 128))
    for step in model.stop_trace().steps:
        for layer, routing in step.items():
            assert masked[layer].isdisjoint(routing.indices.ravel().tolist())
    pruned = sum(map(len, masked.values()))
    expert_bytes = read_manifest(reference_artifact).moe_layers[0].experts[0].weight_bytes
    assert model.total_expert_bytes == (32 - pruned) * expert_bytes  # pruned experts neither shipped nor budgeted


def test_unknown_routing_mode_is_a_clear_error(fixed, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(fixed["tiling"], art)
    data = json.loads((art / "manifest.json").read_text())
    data["moe_layers"][2]["router"]["mode"] = "astrology"
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"layer 2: routing mode 'astrology' is unknown to this runtime "
                                            r"\(known: learned, hash, tiling, cycle\)"):
        load_model(art)


def test_fixed_pattern_artifact_on_emulated_board(reference_model, heldout_tokens, tmp_path):
    from test_board import BOARD_SCRIPT, REPO  # noqa: F401 - the board's own fixture built it

    build = subprocess.run([REPO / "scripts" / "board" / "build-board-a72"], capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-2000:]
    options = dict(routing="tiling", tile=8, calibration=calibration_windows(), progress=False)
    host = compile_model(reference_model, target="host", out=tmp_path / "host", **options)
    a72 = compile_model(reference_model, target="cortex-a72", out=tmp_path / "a72", **options)
    tokens = heldout_tokens[9000:9016][None]
    out = tmp_path / "logits.npy"
    proc = subprocess.run([REPO / "scripts" / "board" / "board-a72-python", "-c", BOARD_SCRIPT, a72, "25%",
                           json.dumps(tokens.tolist()), out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host_model = load_model(host, cache_budget="25%")
    assert np.abs(np.load(out) - host_model(tokens)).max() <= 1e-4 * np.abs(host_model(tokens)).max()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["new"] == host_model.generate(tokens[0], 32)
