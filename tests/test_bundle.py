"""Bundles and delta updates (issue 20): `moetvm pack` / `unpack` / `update`. A full bundle
unpacks to the same bytes; a delta between two compiles that changed one expert carries only that
expert (and the new manifest) and applies atomically; a truncated, altered, misdirected or
unsigned delta leaves the old version exactly as it was."""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.bundle import BundleError, pack, unpack, update
from moetvm.runtime import load_model

CHANGED = (1, 3)  # the expert the second version retrains


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def versions(tmp_path_factory, reference_model):
    """Two compiles of the shipped model: v2 has one expert's weights changed."""
    from moetvm.compiler import compile_model

    d = tmp_path_factory.mktemp("versions")
    v1 = compile_model(reference_model, target="host", out=d / "v1", progress=False)
    changed = copy.deepcopy(reference_model)
    layer, expert = CHANGED
    with torch.no_grad():
        changed.blocks[layer].moe.experts[expert].w_down.weight.mul_(1.5)
    v2 = compile_model(changed, target="host", out=d / "v2", progress=False)
    return v1, v2


def test_full_bundle_round_trip(versions, tmp_path, heldout_tokens):
    v1, _ = versions
    report = pack(v1, tmp_path / "v1.moetvm")
    assert report["kind"] == "full" and report["files"] == len({r.path for r in read_manifest(v1).files()})
    assert report["bundle_bytes"] < report["artifact_bytes"]  # fp32 weights and code compress some
    out = unpack(tmp_path / "v1.moetvm", tmp_path / "board" / "model")
    assert _snapshot(out) == _snapshot(v1)
    tokens = heldout_tokens[:16][None]
    assert np.array_equal(load_model(out)(tokens), load_model(v1)(tokens))
    with pytest.raises(BundleError, match="already exists; refusing to replace it"):
        pack(v1, tmp_path / "v1.moetvm")


def test_delta_holds_only_the_changed_expert_and_applies_atomically(versions, tmp_path):
    v1, v2 = versions
    report = pack(v2, tmp_path / "delta.moetvm", base=v1)
    changed = read_manifest(v2).moe_layers[CHANGED[0]].experts[CHANGED[1]].file
    assert report["kind"] == "delta" and report["files"] == 1 and report["bytes"] == changed.size
    assert report["bundle_bytes"] < changed.size + 64 * 1024  # the expert, a manifest, headers
    board = Path(shutil.copytree(v1, tmp_path / "board"))
    update(board, tmp_path / "delta.moetvm")
    assert _snapshot(board) == _snapshot(v2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".board")]  # no temp dirs left
    # The same delta again: the board is no longer the version it was made against.
    with pytest.raises(BundleError, match="made against another version"):
        update(board, tmp_path / "delta.moetvm")


def test_bad_deltas_leave_the_old_version(versions, tmp_path, reference_artifact):
    v1, v2 = versions
    delta = tmp_path / "delta.moetvm"
    pack(v2, delta, base=v1)
    data = delta.read_bytes()
    board = Path(shutil.copytree(v1, tmp_path / "board"))
    before = _snapshot(board)
    cases = {
        "truncated": (data[:len(data) // 2], "not a readable moetvm bundle|truncated"),
        "altered": (data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:],
                    "not a readable moetvm bundle|SHA-256 mismatch|truncated"),
        "not a bundle": (b"hello", "not a readable moetvm bundle"),
    }
    for name, (content, why) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises((BundleError, ArtifactError), match=why):
            update(board, tmp_path / name)
        assert _snapshot(board) == before, name
    pack(v1, tmp_path / "full.moetvm")
    with pytest.raises(BundleError, match=r"a full bundle; apply it with `moetvm unpack BUNDLE -o DIR`"):
        update(board, tmp_path / "full.moetvm")
    with pytest.raises(BundleError, match=r"a delta bundle; apply it with `moetvm update DIR DELTA`"):
        unpack(delta, tmp_path / "elsewhere")
    other = tmp_path / "other.moetvm"
    pack(v2, other, base=reference_artifact)  # made against another artifact
    with pytest.raises(BundleError, match="made against another version"):
        update(board, other)
    assert _snapshot(board) == before and not (tmp_path / "elsewhere").exists()


def test_unsigned_delta_refused_with_trusted_keys(versions, tmp_path):
    from moetvm.signing import SignatureError, generate_keypair, sign_artifact

    v1, v2 = versions
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(private, public)
    signed_v1 = Path(shutil.copytree(v1, tmp_path / "v1"))
    sign_artifact(signed_v1, private)
    pack(v2, tmp_path / "delta.moetvm", base=signed_v1)  # v2 unsigned
    board = Path(shutil.copytree(signed_v1, tmp_path / "board"))
    before = _snapshot(board)
    with pytest.raises(SignatureError, match="unsigned"):
        update(board, tmp_path / "delta.moetvm", trusted_keys=[public])
    assert _snapshot(board) == before
    signed_v2 = Path(shutil.copytree(v2, tmp_path / "v2"))
    sign_artifact(signed_v2, private)
    pack(signed_v2, tmp_path / "signed.moetvm", base=signed_v1)
    update(board, tmp_path / "signed.moetvm", trusted_keys=[public])
    assert _snapshot(board) == _snapshot(signed_v2)


def test_cli_pack_update(versions, tmp_path):
    v1, v2 = versions
    board = Path(shutil.copytree(v1, tmp_path / "board"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "moetvm.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run("pack", v2, "--base", v1, "-o", tmp_path / "d.moetvm")
    assert proc.returncode == 0 and "delta bundle, 1 files" in proc.stderr, proc.stderr
    proc = run("update", board, tmp_path / "d.moetvm")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(board) == _snapshot(v2)
    proc = run("update", board, tmp_path / "d.moetvm")
    assert proc.returncode != 0 and "made against another version" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run("unpack", tmp_path / "absent.moetvm", "-o", tmp_path / "x")
    assert proc.returncode != 0 and "no such bundle file" in proc.stderr


def test_killed_update_leaves_one_whole_version(versions, tmp_path):
    """`moetvm update` killed at several moments: the directory is always one whole version,
    the old one or the new one, never a mix (the new one is built beside it and renamed in)."""
    import signal
    import time

    v1, v2 = versions
    pack(v2, tmp_path / "delta.moetvm", base=v1)
    old, new = _snapshot(v1), _snapshot(v2)
    outcomes = set()
    for delay in (0.0, 0.3, 0.8, 1.5, 2.5, 4.0):
        board = Path(shutil.copytree(v1, tmp_path / f"board-{delay}"))
        proc = subprocess.Popen([sys.executable, "-m", "moetvm.cli", "update", board, tmp_path / "delta.moetvm"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = _snapshot(board)
        assert state in (old, new), delay
        outcomes.add("new" if state == new else "old")
    # Killed before the swap at least once: at 0 s the interpreter has not started (on a fast,
    # idle machine the update finished within 0.3 s, so every later kill found the new version).
    assert "old" in outcomes
