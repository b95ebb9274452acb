"""Weight files read into one buffer, hashed there, their tensors views of it
(runtime/weight_files.py): the same arrays as safetensors' own reader, aligned where the file
allows, and every malformed header refused with the file named."""

import json
import struct

import numpy as np
import pytest
from safetensors import deserialize
from safetensors.numpy import save_file

from moetvm.artifact import ArtifactError, TensorSpec, file_ref
from moetvm.runtime import tvm_runtime
from moetvm.runtime.weight_files import as_tensor, read_weight_file, tensors_of


@pytest.fixture
def weight_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((64, 48)).astype(np.float32), "w.scale": rng.standard_normal(48).astype(np.float16),
              "q": rng.integers(-128, 127, (3, 5), dtype=np.int8)}  # 15 bytes: what follows it is not aligned
    path = tmp_path / "weights.safetensors"
    save_file(arrays, str(path))
    specs = [TensorSpec(name, list(a.shape), str(a.dtype)) for name, a in arrays.items()]
    return tmp_path, file_ref(tmp_path, path), specs, arrays


def test_tensors_are_the_files_own_views_aligned(weight_file):
    root, ref, specs, arrays = weight_file
    data = read_weight_file(root, ref)
    views, offsets = tensors_of(data, specs, ref.path)
    raw = (root / ref.path).read_bytes()
    theirs = {name: view["data"] for name, view in deserialize(raw)}
    for name, array in arrays.items():
        np.testing.assert_array_equal(views[name], array)
        assert views[name].base is not None and np.shares_memory(views[name], data)  # no copy
        assert raw[offsets[name]:offsets[name] + array.nbytes] == theirs[name]  # the offset is the file's
    # the data section starts 64-byte aligned, so the first tensor crosses to TVM as it lies
    first = min(offsets, key=offsets.get)
    assert views[first].ctypes.data % 64 == 0
    tensor = as_tensor(views[first], tvm_runtime.device("cpu"), on_cpu=True)
    assert tensor.data_ptr() == views[first].ctypes.data
    np.testing.assert_array_equal(tvm_runtime.to_numpy(tensor), arrays[first])
    # a view that is not aligned is copied
    unaligned = next(name for name in arrays if views[name].ctypes.data % 64)
    copied = as_tensor(views[unaligned], tvm_runtime.device("cpu"), on_cpu=True)
    assert copied.data_ptr() != views[unaligned].ctypes.data
    np.testing.assert_array_equal(tvm_runtime.to_numpy(copied), arrays[unaligned])


def _file(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


SPEC = [TensorSpec("w", [2, 2], "float32")]


@pytest.mark.parametrize("raw, message", [
    (b"\x01", r"not a readable safetensors file"),
    (_file({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), length=1 << 40),
     r"not a readable safetensors file \(header length"),
    (struct.pack("<Q", 4) + b"nope" + bytes(16), r"not a readable safetensors file"),
    (_file([], bytes(16)), r"not a readable safetensors file \(the header is not a JSON object\)"),
    (_file({}, bytes(16)), r"tensor w is None, expected float32\[2, 2\]"),
    (_file({"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(16)), r"tensor w is float16\[2, 2\]"),
    (_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), r"tensor w is float32\[4\]"),
    (_file({"w": {"dtype": "X9", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)), r"tensor w is None"),
    (_file({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, bytes(16)), r"tensor w's bytes \[8, 24\] are not its 16"),
    (_file({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16)), r"tensor w's bytes \[0, 12\] are not its 16"),
    (_file({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-4, 12]}}, bytes(16)), r"tensor w's bytes \[-4, 12\]"),
    (_file({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": "0,16"}}, bytes(16)), r"tensor w is None"),
])
def test_malformed_headers_are_refused(raw, message):
    with pytest.raises(ArtifactError, match=r"^dense-0\.safetensors: " + message):
        tensors_of(raw, SPEC, "dense-0.safetensors")


def test_a_file_that_changed_size_is_refused(weight_file):
    root, ref, _, _ = weight_file
    with open(root / ref.path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"size \d+ bytes, manifest says \d+"):
        read_weight_file(root, ref)
