"""Shared fixtures: the shipped reference model and one real compile of it per test session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import moetvm.compiler  # noqa: F401 - first, before TVM loads: it prepares CUDA builds (cuda_driver.py)

REPO = Path(__file__).resolve().parents[1]
# Test files by measured time (a fresh-clone run, 2 workers), slowest first. scripts/test hands out
# whole files (xdist --dist loadfile) in collection order: started first, the long files no
# longer leave one worker running alone at the end while the other idles (~4 minutes of a
# 26-minute run); the rest keep their order after them.
SLOWEST_FIRST = ("test_board.py", "test_tuning.py", "test_streaming.py", "test_reproducible.py", "test_resident_layers.py",
                 "test_text.py", "test_quant.py", "test_onnx.py", "test_routing_modes.py", "test_whole_model.py",
                 "test_bad_inputs.py", "test_cli.py", "test_hf_models.py", "test_fuzz_manifest.py", "test_decode_path.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def board():
    """The emulated Cortex-A72 board's python (qemu-aarch64 + the sysroot of scripts/board/build-board-a72)."""
    proc = subprocess.run([REPO / "scripts" / "board" / "build-board-a72"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return REPO / "scripts" / "board" / "board-a72-python"


@pytest.fixture(scope="session")
def reference_model():
    from moetvm.compiler.models import load_model_source

    return load_model_source("reference")


@pytest.fixture(scope="session")
def heldout_tokens() -> np.ndarray:
    from moetvm.compiler.models import HELDOUT_TEXT

    return np.frombuffer(HELDOUT_TEXT.read_bytes(), dtype=np.uint8).astype(np.int64)


@pytest.fixture(scope="session")
def reference_artifact(tmp_path_factory, reference_model):
    from moetvm.compiler import compile_model

    from moetvm.compiler.models import calibration_windows

    out = tmp_path_factory.mktemp("artifacts") / "reference-host"
    return compile_model(reference_model, target="host", out=out, source="reference", progress=False,
                         calibration=calibration_windows())  # usage profile, as the CLI records it


@pytest.fixture(scope="session")
def a72_artifact(tmp_path_factory, reference_model):
    from moetvm.compiler import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "reference-a72"
    return compile_model(reference_model, target="cortex-a72", out=out, source="reference", progress=False)


@pytest.fixture
def no_library_loads(monkeypatch):
    """Fail the test if any kernel library is loaded: refusals must come before use."""
    import tvm

    loaded = []

    def refuse(path, *args, **kwargs):
        loaded.append(path)
        raise AssertionError(f"library {path} loaded before the artifact was verified")

    monkeypatch.setattr(tvm.runtime, "load_module", refuse)
    return loaded
