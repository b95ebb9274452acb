"""Weights' quantized numbers made once for every target of a compile (api.compile_targets):
kept on disk under a key of all they are made from, in the plain layout of their precision, from
which quant.relayout gives each target's own layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import quant as quantization
from .spec import ExpertWeights


class QuantizedNumbers:
    """Weights' quantized numbers in the plain layout of their precision, made once for every
    target of a compile (quant.relayout gives each target's layout). With a folder
    (api.compile_targets) they are kept there under a key of all they are made from, so the
    targets after the first read them instead of the checkpoint and skip the quantizing;
    without one, made and dropped."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.shared = 0  # weights whose numbers were found made

    def get(self, key, make) -> dict[str, np.ndarray]:
        """The tensors `make()` gives, made once per `key()` (a JSON-able list naming the inputs;
        called only when there is a folder: naming an in-memory weight hashes its bytes)."""
        if self.folder is None:
            return make()
        from safetensors.numpy import load_file

        path = self.folder / f"{store_name(key())}.safetensors"
        if path.is_file():
            self.shared += 1
            return load_file(str(path))
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = make()
        save_tensors(tensors, path)
        return tensors

    def expert(self, expert: ExpertWeights, scheme: quantization.Scheme) -> dict[str, np.ndarray]:
        """An expert's stored tensors in the plain layout of `scheme`'s precision."""
        precision = scheme.plain
        return self.get(lambda: [precision.tag, expert.kind, *map(identity, expert_tensors(expert))],
                        lambda: quantization.quantize_expert(
                            quantization.kernel_layout(expert.w_gate, expert.w_up, expert.w_down, expert.biases,
                                                          expert.kind),
                            precision))

    def finish(self) -> None:
        """Every target is written: the numbers have served."""
        if self.folder is not None:
            remove_store(self.folder)


QUANTIZER = hashlib.sha256(Path(quantization.__file__).read_bytes()).hexdigest()


def store_name(key: list) -> str:
    """A stored file's name from all it is made of (`key`) and the quantizer's code."""
    return hashlib.sha256(json.dumps([QUANTIZER, *key]).encode()).hexdigest()[:32]


def expert_tensors(expert: ExpertWeights) -> tuple:
    """Everything an expert's stored tensors are made from."""
    return tuple(w for w in (expert.w_gate, expert.w_up, expert.w_down, *(expert.biases or ())) if w is not None)


def identity(w) -> str:
    """Names a source tensor's values: a checkpoint tensor by file, size, time and key, others by their bytes."""
    return getattr(w, "identity", None) or hashlib.sha256(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()


def save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Written whole or not at all."""
    from safetensors.numpy import save_file

    part = path.with_suffix(".part")
    save_file(tensors, str(part))
    os.replace(part, path)  # whole or absent: a kill mid-write leaves only a .part


def remove_store(folder: Path) -> None:
    """A store of ours has served."""
    if folder.is_dir() and not folder.is_symlink():  # it holds only our files
        shutil.rmtree(folder, ignore_errors=True)
