"""A transformers checkpoint read tensor by tensor: what lets the compiler stream a model larger
than the workstation's memory.

`streamed_hf_model(path)` builds the model from its config.json with every parameter on zero
pages: an anonymous private mapping of the parameter's size that is never written, so reading it
(tracing, probes) maps the kernel's shared zero page and costs no resident memory. Buffers (rope
tables) are real. Each parameter carries its `checkpoint_source`, a `LazyTensor` that reads its
values from the safetensors shards when asked and keeps nothing; fused expert parameters read one
expert at a time (`FusedExperts`). The compiler reads each weight through these, converts or
quantizes it and writes it out, so its working set is a tensor, not the model.

transformers loads checkpoints through a conversion (per-expert keys merged into fused expert
tensors, modules renamed). The keys of each parameter come from transformers' own reverse
conversion (the one `save_pretrained` writes with), run on shape-only (meta) tensors, so the
layouts understood are transformers' own; a parameter whose keys are missing from the checkpoint,
or whose layout is none of the two below, is refused with its name.
"""

from __future__ import annotations

import functools
import mmap
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moetvm.errors import UsageError

class CheckpointError(UsageError):
    """A checkpoint whose files or tensors cannot be streamed: the message names which."""


class LazyTensor:
    """An fp32 array read when asked (`np.asarray`), never kept: only its shape is held, and
    `identity`, which names the bytes it reads (file, size, modification time, key, part): what
    a resumed compile compares instead of reading them. Given as a function, it is made the first
    time it is asked for (naming in-memory weights hashes their bytes, which most compiles never need)."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape, load: Callable[[], np.ndarray], identity: str | Callable[[], str],
                 load_rows: Callable[[int, int], np.ndarray] | None = None):
        self.shape = tuple(int(d) for d in shape)
        self._load, self._identity, self._load_rows = load, identity, load_rows

    @property
    def identity(self) -> str:
        if callable(self._identity):
            self._identity = self._identity()
        return self._identity

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __array__(self, dtype=None, copy=None):
        array = self._load()
        if array.shape != self.shape:
            raise CheckpointError(f"checkpoint tensor has shape {array.shape}, the model expects {self.shape}")
        return array if dtype is None else array.astype(dtype, copy=False)

    def copy(self) -> "LazyTensor":
        return self  # nothing is held, so nothing is shared

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), read alone where the source allows."""
        return self._load_rows(start, stop) if self._load_rows else np.asarray(self)[start:stop]


class Checkpoint:
    """The tensors of a directory's safetensors files (one file, or shards with or without their
    index), by key: dtype and shape from the headers; values read per call, each file memory-mapped
    only for that read."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors files (a transformers checkpoint is needed)")
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for file in files:
            try:
                with safe_open(file, "pt") as f:
                    for key in f.keys():
                        part = f.get_slice(key)
                        self.entries[key] = (file, tuple(part.get_shape()), part.get_dtype())
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file ({' '.join(str(e).split())})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    @functools.cache
    def _stamp(self, file: Path) -> str:
        """A shard by name, size and modification time, read once per compile (not once per tensor)."""
        stat = file.stat()
        return f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}"

    def identity(self, key: str) -> str:
        """Names tensor `key`'s bytes: its file by name, size and modification time, and the key."""
        return f"{self._stamp(self.entries[key][0])}:{key}"

    def read(self, key: str, index: int | slice | None = None) -> np.ndarray:
        """Tensor `key` (its row or rows `index` only, when given) as a new fp32 array."""
        import torch
        from safetensors import safe_open

        file = self.entries[key][0]
        with safe_open(file, "pt") as f:
            tensor = f.get_tensor(key) if index is None else f.get_slice(key)[index]
        return tensor.to(torch.float32, copy=True).numpy()


class FusedExperts:
    """A fused expert parameter (E, a, b), read one expert's (a, b) at a time: from one checkpoint
    tensor of the same shape (renamed only: GraniteMoE's input_linear), or from E keys per chunk
    of the a rows (per-expert keys, merged and concatenated by transformers: OLMoE's gate_proj and
    up_proj, Mixtral's w1 and w3)."""

    def __init__(self, name: str, shape, chunks: list[list[str]] | None, fused_key: str | None, checkpoint: Checkpoint):
        self.name, self.shape, self.chunks, self.fused_key, self.checkpoint = name, tuple(shape), chunks, fused_key, checkpoint

    def expert(self, e: int, rows: slice = slice(None)) -> np.ndarray:
        if self.fused_key is not None:
            return self.checkpoint.read(self.fused_key, e)[rows]
        start, stop, _ = rows.indices(self.shape[1])
        parts, offset = [], 0
        for keys in self.chunks:  # read only the chunks the rows overlap
            n = self.checkpoint.shape(keys[e])[0]
            if offset < stop and start < offset + n:
                parts.append(self.checkpoint.read(keys[e])[max(start - offset, 0): stop - offset])
            offset += n
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def lazy(self, e: int, rows: slice = slice(None), transposed: bool = False) -> LazyTensor:
        """Expert e's rows `rows` (of its transpose, when the model stores experts (E, in, out))."""
        keys = [self.fused_key] if self.fused_key is not None else [chunk[e] for chunk in self.chunks]
        identity = f"{[self.checkpoint.identity(k) for k in keys]}[{e}][{rows}]{'.T' if transposed else ''}"
        if transposed:
            shape = np.empty(self.shape[1:][::-1], np.bool_)[rows].shape
            return LazyTensor(shape, lambda: np.ascontiguousarray(self.expert(e).T[rows]), identity)
        shape = np.empty(self.shape[1:], np.bool_)[rows].shape
        return LazyTensor(shape, lambda: self.expert(e, rows), identity)


def checkpoint_source(tensor):
    """The `LazyTensor` or `FusedExperts` a streamed parameter reads from, or None."""
    return getattr(tensor, "checkpoint_source", None)


@contextmanager
def _parameters_on_meta():
    """Within: every parameter a module registers moves to the meta device (no memory, no
    initialisation), while buffers (rope tables) are made for real."""
    import torch
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = register


def _zero_pages(shape, dtype):
    """A tensor of zeros backed by an anonymous mapping that is never written: reading it maps the
    shared zero page, so it holds no memory however large."""
    import torch

    nbytes = max(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(), 1)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    return torch.frombuffer(pages, dtype=dtype, count=int(np.prod(shape))).view(shape)


PROBE_LAYERS = 4  # a stand-in's layers: every kind of a per-layer attention pattern (Cohere2: 3 windowed in 4)
PROBE_VOCAB = 64


def probe_stand_in(config) -> "torch.nn.Module":
    """A small model of `config`'s architecture with real random weights, for the wrapper's
    numerical probes (attention window, cache layout), which a model of zeros would pass
    whatever they test: its first PROBE_LAYERS layers, a PROBE_VOCAB-token vocabulary, the
    experts left on zero pages (an MoE block adds nothing; the probes are about attention)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    layers = min(config.num_hidden_layers, PROBE_LAYERS)
    if getattr(config, "layer_types", None):
        # Through the first layer of every kind: a hybrid's attention may come after several
        # Mamba layers, and the cache layout is probed from it.
        first = {kind: i for i, kind in reversed(list(enumerate(config.layer_types)))}
        layers = min(config.num_hidden_layers, max(layers, max(first.values()) + 1))
        config.layer_types = list(config.layer_types)[:layers]
    config.num_hidden_layers, config.vocab_size = layers, PROBE_VOCAB
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if ".experts" in f".{module_name}" or param.ndim == 3:
                values = _zero_pages(tuple(param.shape), param.dtype)
            else:
                values = torch.randn(param.shape, generator=generator) * 0.02 + (1.0 if param.ndim == 1 else 0.0)
            module._parameters[name] = torch.nn.Parameter(values, requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


_EXPERT_INDEX = re.compile(r"\.(\d+)\.")


def _expert_chunks(keys: list[str], n_experts: int) -> list[list[str]] | None:
    """Per-expert keys grouped by chunk (in the order transformers concatenates them), each
    chunk's keys in expert order; None when they are not E keys per chunk."""
    chunks: dict[str, dict[int, str]] = {}
    for key in keys:
        found = list(_EXPERT_INDEX.finditer(key))
        if not found:
            return None
        last = found[-1]
        pattern = key[: last.start()] + ".*." + key[last.end():]
        chunks.setdefault(pattern, {})[int(last.group(1))] = key
    if any(sorted(c) != list(range(n_experts)) for c in chunks.values()):
        return None
    return [[c[e] for e in range(n_experts)] for c in chunks.values()]


def _read_persistent_buffers(model, checkpoint: Checkpoint) -> None:
    """The persistent buffers the checkpoint holds, read now (the model made them from its
    config): small tensors the adapters read as values, e.g. LFM2's and DeepSeek-V3's expert
    selection biases, which left at their initial zeros would route every token differently."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    for module_name, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None or name in module._non_persistent_buffers_set:
                continue
            full = f"{module_name}.{name}" if module_name else name
            keys = list(revert_weight_conversion(model, {full: torch.empty(tuple(buffer.shape), device="meta")}))
            if len(keys) == 1 and keys[0] in checkpoint.entries and checkpoint.shape(keys[0]) == tuple(buffer.shape):
                module._buffers[name] = torch.from_numpy(checkpoint.read(keys[0])).to(buffer.dtype)


def streamed_hf_model(path: Path, config) -> "torch.nn.Module":
    """The transformers model of `config` (fp32) on zero pages, each parameter carrying its
    `checkpoint_source` in the checkpoint at `path`; `checkpoint_precision` says what the
    checkpoint stores (fp32, fp16 or bf16)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    checkpoint = Checkpoint(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = {k: v for k, v in (getattr(model, "_tied_weights_keys", None) or {}).items()} \
        if getattr(config, "tie_word_embeddings", False) else {}
    sources = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        shape = tuple(param.shape)
        wanted = revert_weight_conversion(model, {name: torch.empty(shape, device="meta", dtype=param.dtype)})
        keys = list(wanted)
        if not all(k in checkpoint.entries for k in keys) and name in tied:
            keys = list(revert_weight_conversion(model, {tied[name]: torch.empty(shape, device="meta")}))
        missing = [k for k in keys if k not in checkpoint.entries]
        if missing:
            raise CheckpointError(f"hf:{path}: parameter {name} needs checkpoint tensor(s) {missing[:3]}, which the "
                                  f"checkpoint does not have")
        if len(keys) == 1 and checkpoint.shape(keys[0]) == shape:
            key = keys[0]
            source = (FusedExperts(name, shape, None, key, checkpoint) if name.endswith(("gate_up_proj", "down_proj"))
                      and param.ndim == 3 else LazyTensor(shape, lambda key=key: checkpoint.read(key), checkpoint.identity(key),
                                                          lambda a, b, key=key: checkpoint.read(key, slice(a, b))))
        else:
            chunks = _expert_chunks(keys, shape[0]) if param.ndim == 3 else None
            if chunks is None or sum(checkpoint.shape(c[0])[0] for c in chunks) != shape[1]:
                raise CheckpointError(f"hf:{path}: parameter {name} {list(shape)} comes from checkpoint tensors "
                                      f"{keys[:3]}{'...' if len(keys) > 3 else ''} in a layout the streaming reader "
                                      f"does not know")
            source = FusedExperts(name, shape, chunks, None, checkpoint)
        sources[name] = source
    # Every parameter on zero pages, then its source attached (tied parameters share one object).
    for module_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            if param.device.type == "meta":
                param = torch.nn.Parameter(_zero_pages(tuple(param.shape), param.dtype), requires_grad=False)
                module._parameters[pname] = param
            if checkpoint_source(param) is None:
                param.checkpoint_source = sources[full]
    if tied:
        model.tie_weights()
    _read_persistent_buffers(model, checkpoint)
    dtypes: dict[str, int] = {}  # the checkpoint's precision: that of most of its bytes
    for _, shape, dtype in checkpoint.entries.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + int(np.prod(shape))
    model.checkpoint_precision = {"BF16": "bf16", "F16": "fp16"}.get(max(dtypes, key=dtypes.get), "fp32")
    return model.eval()

