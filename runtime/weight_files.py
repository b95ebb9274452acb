"""Weight files (safetensors) read once into memory where their tensors can be used as they lie.

An expert loaded through a cache at a 25% budget is one of ~220 loads a GraniteMoE int4 token
makes. Read into chunks and joined, then deserialized by safetensors (a copy of each tensor),
then uploaded (another), a 885 KB file took 1.54 ms, 0.53 of it SHA-256; now 1.16. The file is read
straight into one buffer, hashed there, and its tensors are views of it: the buffer is placed
so that the data section (after the 8-byte length and the JSON header) starts on a 64-byte
boundary, and a tensor whose offset keeps that alignment crosses to TVM without a copy.

The header is parsed here rather than by safetensors (whose `deserialize` copies every tensor):
as untrusted input, each tensor the manifest names must be there with the manifest's dtype and
shape, its byte range inside the data section and as long as those make it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moetvm.artifact import DTYPE_BYTES, ArtifactError, FileRef, read_verified_into

from . import tvm_runtime
from .host_memory import ALIGN, aligned_empty

# safetensors' names of the dtypes a weight file may hold, as artifact.DTYPE_BYTES names them (bf16
# arrays are ml_dtypes', which NumPy does not name: tvm_runtime.numpy_dtype).
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8", "I32": "int32",
                 "I64": "int64"}


def read_weight_file(root: Path, ref: FileRef, verify: bool = True) -> np.ndarray:
    """The file's bytes, verified, in a uint8 array whose data section starts 64-byte aligned."""
    def placed(first: bytes) -> np.ndarray:
        header = int.from_bytes(first, "little") if len(first) == 8 else 0
        raw = aligned_empty((ref.size + ALIGN,), np.uint8)
        shift = -(8 + header) % ALIGN
        return raw[shift:shift + ref.size]

    return read_verified_into(root, ref, placed, verify)


def tensors_of(data, specs, path: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({name: array viewing `data`}, {name: its byte offset in the file}) for the tensors
    `specs` (artifact.TensorSpec) of a safetensors file's bytes `data`."""
    data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    try:
        length = int.from_bytes(data[:8].tobytes(), "little")
        if len(data) < 8 or not 2 <= length <= len(data) - 8:
            raise ValueError(f"header length {length} in a {len(data)}-byte file")
        header = json.loads(data[8:8 + length].tobytes())
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    start, end = 8 + length, len(data)
    arrays, offsets = {}, {}
    for spec in specs:
        entry = header.get(spec.name)
        try:
            dtype, shape, (first, last) = STORED_DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            dtype = shape = None
        if dtype != spec.dtype or shape != spec.shape:
            got = None if dtype is None else f"{dtype}{shape}"
            raise ArtifactError(f"{path}: tensor {spec.name} is {got}, expected {spec.dtype}{spec.shape}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (type(first) is int and type(last) is int and 0 <= first and last - first == nbytes
                and start + last <= end):
            raise ArtifactError(f"{path}: tensor {spec.name}'s bytes {[first, last]} are not its {nbytes} inside the file")
        arrays[spec.name] = data[start + first:start + last].view(tvm_runtime.numpy_dtype(dtype)).reshape(shape)
        offsets[spec.name] = start + first
    return arrays, offsets


def as_tensor(array: np.ndarray, device, on_cpu: bool) -> tvm_runtime.Tensor:
    """A view of a weight file's buffer as a tensor: on the CPU the view itself where it is
    aligned and writable (its buffer kept alive by the tensor), else a copy."""
    if on_cpu and array.flags.writeable and array.ctypes.data % ALIGN == 0:
        return tvm_runtime.wrap(array)
    return tvm_runtime.tensor(array, device)
