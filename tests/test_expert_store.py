"""On-demand experts over loopback HTTP (issue 20): an artifact deployed without its expert files
fetches the experts its tokens use from `moetvm serve-experts`, verified, into a bounded on-disk
store; a corrupted download is refused and not kept."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.runtime import load_model
from servers import start, stop


def _serve_experts(root: Path, log: Path):
    proc, line = start([sys.executable, "-m", "moetvm.cli", "serve-experts", root, "--port", "0"],
                       "serving experts", log, timeout=120)
    port = re.search(r":(\d+)/", line).group(1)
    return proc, f"http://127.0.0.1:{port}/"


def _without_experts(artifact: Path, to: Path) -> Path:
    """The artifact as deployed on demand: everything but the expert files."""
    m = read_manifest(artifact)
    experts = {ref.path for ref in m.weight_files()} - {w.file.path for w in m.weights}
    shutil.copytree(artifact, to, ignore=lambda d, names: [n for n in names
                                                           if (Path(d) / n).relative_to(artifact).as_posix() in experts])
    assert all(not (to / p).exists() for p in experts)
    return to


def test_experts_fetched_on_demand_into_a_bounded_store(reference_artifact, heldout_tokens, tmp_path):
    server, url = _serve_experts(reference_artifact, tmp_path / "serve.log")
    try:
        board = _without_experts(reference_artifact, tmp_path / "board")
        prompt = heldout_tokens[6000:6016]
        expected = load_model(reference_artifact, cache_budget="25%").generate(prompt, 48)
        model = load_model(board, cache_budget="25%", expert_source=url, expert_store=tmp_path / "small",
                           expert_store_budget="50%")
        assert model.generate(prompt, 48) == expected
        store = model.stats()["expert_store"]
        assert store["downloads"] > 0 and store["store_evictions"] > 0
        files = sum(e.file.size for layer in read_manifest(board).moe_layers for e in layer.experts)
        assert store["stored_bytes"] <= store["budget_bytes"] == files // 2
        # A store that holds them all: a second model on it downloads nothing.
        first = load_model(board, cache_budget="25%", expert_source=url, expert_store=tmp_path / "store")
        assert first.generate(prompt, 48) == expected
        downloaded = first.stats()["expert_store"]["downloaded_bytes"]
        assert 0 < downloaded <= files
        again = load_model(board, cache_budget="25%", expert_source=url, expert_store=tmp_path / "store")
        assert again.generate(prompt, 48) == expected
        assert again.stats()["expert_store"]["downloads"] == 0 and again.stats()["expert_store"]["store_hits"] > 0
        # Without a source, the missing files are an error at load, as before.
        with pytest.raises(ArtifactError, match="missing from the artifact"):
            load_model(board)
    finally:
        stop(server)


def test_corrupted_download_refused_and_not_kept(reference_artifact, heldout_tokens, tmp_path):
    served = Path(shutil.copytree(reference_artifact, tmp_path / "served"))
    for ref in read_manifest(served).moe_layers[0].experts:  # every expert of layer 0 corrupted at the source
        path = served / ref.file.path
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    server, url = _serve_experts(served, tmp_path / "serve.log")
    try:
        board = _without_experts(reference_artifact, tmp_path / "board")
        model = load_model(board, cache_budget="100%", preload=0, expert_source=url, expert_store=tmp_path / "store")
        with pytest.raises(ArtifactError, match=r"experts/layer0/expert\d+\.safetensors: downloaded from .*mismatch"):
            model(heldout_tokens[:8][None])
        corrupted = {ref.file.sha256 for ref in read_manifest(board).moe_layers[0].experts}
        assert not corrupted & {p.name for p in (tmp_path / "store").iterdir()}
    finally:
        stop(server)
    with pytest.raises(Exception, match="give an http"):
        load_model(board, expert_source="ftp://example/")
    assert np.isfinite(load_model(reference_artifact)(heldout_tokens[:8][None])).all()
