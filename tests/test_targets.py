"""Cross targets: AArch64 libraries for the Cortex-A72 (no SVE), sm_87 device code for Orin."""

import os
import subprocess
import sys

import pytest
import tvm

from moetvm.artifact import read_manifest
from moetvm.targets import DeployTarget, TargetError, get_target
from moetvm.targets.binaries import cuda_architectures, elf_machine, sve_instructions

pytestmark = pytest.mark.slow


def test_cortex_a72_libraries_are_aarch64_without_sve(a72_artifact):
    manifest = read_manifest(a72_artifact)
    assert manifest.target.tvm_target["mcpu"] == "cortex-a72"
    assert manifest.target.rpc_key == "rasp4"  # deploy --tracker asks for this key, no registry lookup
    for lib in manifest.libraries:
        path = a72_artifact / lib.file.path
        assert elf_machine(path) == "aarch64", lib.name
        assert sve_instructions(path) == [], lib.name


def test_sve_detector_sees_sve_when_present(tmp_path):
    """Control for the check above: the same loop built by the cross gcc for an SVE core
    (armv8.2-a+sve, auto-vectorised) is flagged; built for the A72 it is not."""
    src = tmp_path / "axpy.c"
    src.write_text("void axpy(float *y, const float *x, float a, int n) { for (int i = 0; i < n; i++) y[i] += a * x[i]; }\n")
    for march, expect_sve in (("armv8.2-a+sve", True), ("armv8-a", False)):
        obj = tmp_path / f"{march}.o"
        subprocess.run(["aarch64-linux-gnu-gcc", "-O3", f"-march={march}", "-c", str(src), "-o", str(obj)], check=True)
        assert bool(sve_instructions(obj)) == expect_sve, march


def test_jetson_orin_device_code_is_sm87(tmp_path, reference_model):
    from moetvm.compiler import compile_model

    out = compile_model(reference_model, target="jetson-orin", out=tmp_path / "orin", progress=False)
    manifest = read_manifest(out)
    assert {lib.name for lib in manifest.libraries} == {"segments", "routers", "expert_swiglu_128x256_fp32"}
    for lib in manifest.libraries:
        path = out / lib.file.path
        assert elf_machine(path) == "aarch64"  # the host side runs on the Orin's Cortex-A78AE
        archs = cuda_architectures(path)
        assert archs and all(e["sm"] == 87 for e in archs), (lib.name, archs)
        assert any(e["kind"] == "cubin" for e in archs)
        assert b"__global__" not in path.read_bytes()  # device code, not CUDA source
        info = manifest.compile_info["device_code"][lib.name]
        # dlight GPU schedules: every kernel runs thread blocks, none is a one-thread fallback.
        assert info["cuda_kernels"] >= 1 and info["min_threads_per_block"] >= 32


def test_missing_cross_compiler_names_the_package(reference_model, tmp_path):
    from moetvm.compiler import compile_model

    board = DeployTarget(name="riscv-board", description="", tvm_target={"kind": "llvm", "mtriple": "riscv64-linux-gnu"},
                         cross_compiler="riscv64-linux-gnu-g++-nonexistent", cross_compiler_package="g++-riscv64-linux-gnu")
    with pytest.raises(TargetError, match=r"install it \(Debian/Ubuntu: apt-get install g\+\+-riscv64-linux-gnu\)"):
        compile_model(reference_model, target=board, out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_user_target_from_toml(tmp_path):
    (tmp_path / "boards.toml").write_text(
        '[targets.rock5b]\n'
        'description = "Radxa Rock 5B: Cortex-A76"\n'
        'tvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a76", mattr = ["+neon"] }\n'
        'cross_compiler = "aarch64-linux-gnu-g++"\n'
        'memory_budget = 2147483648\n'
        'rpc_key = "rock5b"\n'
    )
    target = get_target("rock5b", [tmp_path / "boards.toml"])
    assert target.tvm_target["mcpu"] == "cortex-a76" and target.rpc_key == "rock5b"
    tvm.target.Target(target.tvm_target)  # a valid TVM target
    env = {**os.environ, "MOETVM_TARGETS": str(tmp_path / "boards.toml")}
    out = subprocess.run([sys.executable, "-m", "moetvm.cli", "targets"], capture_output=True, text=True, env=env, check=True)
    assert "rock5b" in out.stdout and "Cortex-A76" in out.stdout
