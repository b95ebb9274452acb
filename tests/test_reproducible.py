"""Reproducible builds: the same model compiled twice gives byte-identical artifacts.

TVM orders some generated code by object address (see compiler/lowering.py, "reproducible
builds"), so the end-to-end checks compile in two separate processes with different hash seeds,
output directories and working directories: what a second compile on another day would differ in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moetvm.compiler  # noqa: F401 - first, before TVM loads (see compiler/cuda_driver.py)
from moetvm.compiler.lowering import canonical_shape_funcs

VOLATILE_MANIFEST_FIELDS = (("compile_info", "seconds"),)  # wall-clock time: not part of the build


def _digest(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "manifest.json":
        manifest = json.loads(data)
        for section, key in VOLATILE_MANIFEST_FIELDS:
            manifest.get(section, {}).pop(key, None)
        data = json.dumps(manifest, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _compile(targets: list[str], out: Path, hash_seed: str) -> None:
    out.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-m", "moetvm.cli", "compile", "reference",
                           *(arg for t in targets for arg in ("--target", t)), "-o", str(out), "--quiet"],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"compile for {targets} failed:\n{proc.stdout}\n{proc.stderr}"


def _missing_toolchain(target: str) -> str | None:
    needs = {"cortex-a72": ["aarch64-linux-gnu-g++"], "jetson-orin": ["aarch64-linux-gnu-g++", "nvcc"]}
    missing = [tool for tool in needs.get(target, []) if shutil.which(tool) is None]
    return f"{target} needs {', '.join(missing)} on PATH" if missing else None


@pytest.mark.slow
def test_two_compiles_give_identical_artifacts(tmp_path):
    """Every target in one compile (compile_targets: the later targets are built in a process
    that already built the earlier ones, the heap moved), twice."""
    targets = [t for t in ("host", "cortex-a72", "jetson-orin") if _missing_toolchain(t) is None]
    first, second = tmp_path / "a" / "first", tmp_path / "second-compile" / "out"
    _compile(targets, first, hash_seed="1")
    _compile(targets, second, hash_seed="2")
    for target in targets:
        ours, theirs = _digests(first / target), _digests(second / target)
        assert any(name.startswith("lib/") for name in ours), f"no libraries in {first / target}"
        differ = sorted(name for name in ours.keys() & theirs.keys() if ours[name] != theirs[name])
        only = sorted(ours.keys() ^ theirs.keys())
        assert not differ and not only, (f"{target}: compiles of the same model differ in {differ}"
                                         + (f"; files in only one of them: {only}" if only else ""))


# --- without a full compile ---------------------------------------------------------------------

def _symbolic_concat_module():
    """Three symbolic lengths concatenated, transposed and broadcast: kernels that take several
    shape vars as scalar parameters, fused groups with several free vars, shape functions with
    several stores. Without the fixes in lowering.py nearly every lowering of it differed."""
    from tvm.script import ir as I, relax as R, tirx as T

    @I.ir_module
    class Module:
        @R.function
        def main(a: R.Tensor(("b", "p", 32), "float32"), c: R.Tensor(("b", "q", 32), "float32"),
                 d: R.Tensor(("b", "r", 32), "float32")):
            b, p, q, r = T.int64(), T.int64(), T.int64(), T.int64()
            with R.dataflow():
                x = R.concat((a, c, d), axis=1)
                y = R.permute_dims(x, [0, 2, 1])
                z = R.broadcast_to(y, R.shape([b, 32, r + q + p]))
                w = R.add(z, z)
                R.output(w)
            return w

    return Module


def test_lowering_does_not_depend_on_object_addresses(tmp_path):
    """TVM orders parts of the generated code by object address: lower the same module several
    times in one process, moving the heap between tries, and get one result."""
    import random

    from tvm import tirx

    from moetvm.compiler.lowering import build_library, relax_pipeline
    from moetvm.compiler.build_target import BuildTarget

    target = BuildTarget.resolve("host")
    tgt = target.tvm
    rng = random.Random(0)
    ballast, lowered = [], set()
    for _ in range(8):
        ballast.append([tirx.Var("ballast", "int64") for _ in range(rng.randint(0, 3000))])
        with tgt:
            lowered.add(relax_pipeline(tgt)(_symbolic_concat_module()).script())
    assert len(lowered) == 1, f"{len(lowered)} different lowerings of one module in 8 tries"

    libraries = set()
    for i in range(2):
        ballast.append([tirx.Var("ballast", "int64") for _ in range(rng.randint(0, 3000))])
        path = tmp_path / f"try{i}" / "lib.so"
        path.parent.mkdir()
        build_library(_symbolic_concat_module(), target, path)
        libraries.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(libraries) == 1, "two builds of one module gave different libraries"


def test_kernel_shape_params_come_in_order_of_use():
    """Legalization gives a kernel the symbolic vars its shapes use but do not bind as extra
    parameters; TVM collected them in a `set` of address-hashed objects (a different order per
    process). Eight of them: the chance of first-use order by accident is 1 in 40320."""
    from tvm import relax, te, tirx

    dims = [tirx.Var(f"s{i}", "int64") for i in range(8)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((sum(dims[1:], dims[0]), 4), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit_te(lambda t: te.compute(t.shape, lambda i, j: t[i, j] * 2, name="y"), x))
    (kernel,) = [f for _, f in bb.get().functions_items() if isinstance(f, tirx.PrimFunc)]
    assert [p.name for p in kernel.params] == ["x", *(d.name for d in dims), "y"]


def _with_shape_funcs(*funcs):
    from tvm import relax

    bb = relax.BlockBuilder()
    gvs = [bb.add_func(f, "shape_func") for f in funcs]
    h = relax.Var("h", relax.TensorType((3,), "int64"))
    with bb.function("main", [h], pure=False):
        for gv in gvs:
            bb.emit(relax.Call(gv, [h]))
        bb.emit_func_output(h)
    return bb.get()


def test_equal_shape_functions_merge_whatever_their_store_order():
    """VMShapeLower writes a shape function's stores in unordered_map order, and merges equal
    functions only when that order happens to agree."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def forward(H: T.Buffer((T.int64(3),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(1)] = T.int64(32) * H[T.int64(0)]
        H[T.int64(2)] = T.int64(4) * H[T.int64(0)]

    @T.prim_func(private=True, s_tir=True)
    def backward(H: T.Buffer((T.int64(3),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(2)] = T.int64(4) * H[T.int64(0)]
        H[T.int64(1)] = T.int64(32) * H[T.int64(0)]

    @T.prim_func(private=True, s_tir=True)
    def other(H: T.Buffer((T.int64(3),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(1)] = H[T.int64(0)] + T.int64(1)

    one = canonical_shape_funcs(_with_shape_funcs(forward, backward, other))
    two = canonical_shape_funcs(_with_shape_funcs(backward, forward, other))  # same calls, other order
    assert one.script() == two.script()
    assert sorted(gv.name_hint for gv in one.get_global_vars()) == ["main", "shape_func", "shape_func1"]
    calls = re.findall(r"cls\.(shape_func\d*)\(h\)", one.script())
    assert len(calls) == 3 and calls[0] == calls[1] != calls[2], calls  # forward and backward: one function
