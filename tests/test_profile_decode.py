"""scripts/bench/profile_decode.py: perf's samples of a real decode, attributed to the artifact's
kernels by their own symbol tables, and to the runtime, Python and libc around them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench" / "profile_decode.py"


def _perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    return subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _perf_works(), reason="needs Linux perf, permitted to profile this user's processes")
def test_profile_names_the_kernels_and_the_host_share(reference_artifact, tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(reference_artifact), "--tokens", "400", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "outside the kernels" in run.stdout and "kernel (main thread)" in run.stdout
    result = json.loads(out.read_text())
    assert result["tokens"] == 400 and result["threads"] == 1  # the prompt's token is prefilled before sampling
    assert sum(result["categories"].values()) == pytest.approx(1.0, abs=1e-6)
    assert 0 < result["outside_kernels_share"] < 1
    # Every kernel is named from its library's symbols: a TVM kernel, never a raw address.
    manifest = json.loads((reference_artifact / "manifest.json").read_text())
    libraries = {lib["name"] for lib in manifest["libraries"]}
    assert result["kernels"] and {k["library"] for k in result["kernels"]} <= libraries
    assert "segments" in {k["library"] for k in result["kernels"]}
    assert not any(k["kernel"].startswith("0x") or k["kernel"] == "?" for k in result["kernels"])
    kernel_share = sum(k["share"] for k in result["kernels"])
    library_share = sum(v for name, v in result["categories"].items()
                        if name.startswith("kernels: ") and name.removeprefix("kernels: ") in libraries)
    assert kernel_share == pytest.approx(library_share, abs=1e-6)


def test_profile_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile_decode: ") and "Traceback" not in run.stderr, run.stderr
