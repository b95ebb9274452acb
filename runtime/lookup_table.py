"""An input embedding table held slice by slice, as the tokens that read it arrive.

A token reads one row of an untied input embedding table, yet loaded whole the table is resident
for the model's life: OLMoE's 50,304 x 1,024 is 206 MB at fp32 and 51 MB at int8, for the 80
rows a short generation reads. The artifact marks such a table (artifact.TensorSpec.lookup_rows:
slice i along its first axis holds token rows [i * rows, (i + 1) * rows)). Here it lives in an
anonymous mapping of its full size that no page backs until written (4 KB pages: a huge page
would back 2 MB at the first row), and a slice is read from the weight file the first time one of
its tokens comes. The kernels read the tensor as ever, at rows that are there.

Loaded exactly as verified: at load the file is read and hashed whole against the manifest, as
every weight file is, and the SHA-256 of each of the table's slices in those bytes is kept; a
slice read later is used only if its bytes give the same digest (a file changed since is an
ArtifactError, as an expert's is when fetched).
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from moetvm.artifact import ArtifactError


class LookupTable:
    """One table's slices: `array` (the full shape, unread slices zero) and `fill(tokens)`."""

    def __init__(self, path: Path, offset: int, verified: np.ndarray, rows: int):
        """`verified`: the table as read from `path` at byte `offset`, in the bytes that matched
        the manifest's hash (only digested here, not kept); `rows`: token rows per slice."""
        self.path, self.offset, self.rows = path, offset, rows
        self.shape, self.dtype = verified.shape, verified.dtype
        self.slice_bytes = math.prod(verified.shape[1:]) * verified.dtype.itemsize
        flat = np.ascontiguousarray(verified).reshape(-1).view(np.uint8)  # (bytes: bfloat16 has no buffer format)
        self._digests = [hashlib.sha256(flat[i * self.slice_bytes:(i + 1) * self.slice_bytes]).digest()
                         for i in range(verified.shape[0])]
        self._block = mmap.mmap(-1, max(1, verified.nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # under THP "always" the first row would back 2 MB
            self._block.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._block, verified.dtype, count=verified.size).reshape(verified.shape)
        self._filled = bytearray(verified.shape[0])
        self._lock = threading.Lock()
        self.slices_read = 0
        self._file = open(path, "rb", buffering=0)  # held: a file replaced since load is still this one

    def fill(self, tokens) -> None:
        """Make the slices of these token ids resident (ids past the table read its last slice,
        as the gather's clip mode does)."""
        for index in np.unique(np.clip(np.asarray(tokens).ravel() // self.rows, 0, len(self._filled) - 1)).tolist():
            if not self._filled[index]:
                self._read(index)

    def fill_token(self, token: int) -> None:
        """fill([token]) for one decode token: an index and a test when its slice is there."""
        index = min(max(token, 0) // self.rows, len(self._filled) - 1)
        if not self._filled[index]:
            self._read(index)

    def _read(self, index: int) -> None:
        with self._lock:  # threads generating at once: each slice read once
            if not self._filled[index]:
                self._read_locked(index)

    def _read_locked(self, index: int) -> None:
        try:
            data = os.pread(self._file.fileno(), self.slice_bytes, self.offset + index * self.slice_bytes)
        except OSError as e:
            raise ArtifactError(f"{self.path}: cannot read slice {index} of an embedding table ({e.strerror or e})") from None
        if len(data) != self.slice_bytes or hashlib.sha256(data).digest() != self._digests[index]:
            raise ArtifactError(f"{self.path}: changed since it was loaded (slice {index} of an embedding table "
                                f"differs from the bytes verified then)")
        self.array[index] = np.frombuffer(data, self.dtype).reshape(self.shape[1:])
        self._filled[index] = 1
        self.slices_read += 1

    @property
    def resident_bytes(self) -> int:
        return self.slices_read * self.slice_bytes

