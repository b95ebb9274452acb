"""An untied input embedding table held by the slices its tokens reach (runtime/lookup_table.py):
the manifest marks it, the runtime reads a slice, verified, when a token first needs it, and the
logits and greedy tokens are transformers' own."""

import mmap
import shutil
import struct

import numpy as np
import pytest
import torch

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.compiler import compile_model
from moetvm.runtime import load_model
from moetvm.verify import relative_error
from hf_models import greedy_ids, tiny_model

pytest.importorskip("transformers")

VOCAB = 1024  # 16 slices of 64 token rows (the CPU's tile)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = tiny_model("olmoe", vocab_size=VOCAB)
    out = compile_model(model, target="host", out=tmp_path_factory.mktemp("lookup") / "olmoe", progress=False)
    return model, out


def _table_spec(manifest):
    (spec,) = [t for w in manifest.weights for t in w.tensors if t.lookup_rows is not None]
    return spec


def _resident_bytes(array: np.ndarray) -> int:
    """Bytes of the pages under `array` that are backed (/proc/self/pagemap's present bit: the
    table's own pages, whatever mapping the kernel merged its own with)."""
    page = mmap.PAGESIZE
    first, last = array.ctypes.data // page, (array.ctypes.data + array.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    return page * sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries))


def test_only_the_untied_input_table_is_marked(untied):
    _, out = untied
    spec = _table_spec(read_manifest(out))
    assert spec.name == "model.embed_tokens.weight" and spec.lookup_rows == 64 and spec.shape[0] == VOCAB // 64
    # the LM head reads every row each token; it is loaded whole
    assert all(t.lookup_rows is None for w in read_manifest(out).weights for t in w.tensors if t.name.startswith("lm_head"))


def test_slices_are_read_as_tokens_reach_them(untied):
    model, out = untied
    runtime = load_model(out)
    table = runtime._lookups[0]
    assert runtime.stats()["lookup_tables"]["slices_read"] == 0
    assert _resident_bytes(table.array) == 0  # nothing backs the table before a token needs it

    tokens = np.array([[3, 5, 70, 3, 900]])  # slices 0, 1 and 14
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    assert relative_error(runtime(tokens), theirs) < 1e-4
    stats = runtime.stats()["lookup_tables"]
    assert stats["slices_read"] == 3 and stats["slices"] == 16
    assert stats["resident_bytes"] == 3 * table.slice_bytes < stats["bytes"]
    assert _resident_bytes(table.array) <= 3 * table.slice_bytes + 2 * mmap.PAGESIZE
    unread = [i for i in range(16) if i not in (0, 1, 14)]
    assert not table.array[unread].any()

    # Greedy decoding on the in-place cache (one call a token once it runs), each new token's
    # slice read on its way in: transformers' tokens.
    prompt = np.array([10, 200, 400, 1000])
    ours = runtime.generate(prompt, 12)
    assert ours == greedy_ids(model, prompt, 12)
    seen = {int(t) // 64 for t in [3, 5, 70, 900, *prompt, *ours[:-1]]}  # the last token is never fed back
    assert runtime.stats()["lookup_tables"]["slices_read"] == len(seen)


def test_a_slice_changed_after_load_is_refused(untied, tmp_path):
    _, out = untied
    art = tmp_path / "art"
    shutil.copytree(out, art)
    manifest = read_manifest(art)
    spec = _table_spec(manifest)
    (weight_file,) = [w for w in manifest.weights if spec in w.tensors]
    runtime = load_model(art)
    table = runtime._lookups[0]
    runtime(np.array([[1]]))  # slice 0, read before the change
    with open(art / weight_file.file.path, "r+b") as f:  # the same file, edited in place
        f.seek(table.offset + 5 * table.slice_bytes + 17)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    runtime(np.array([[2]]))  # a slice read before still serves
    with pytest.raises(ArtifactError, match=rf"{weight_file.file.path}: changed since it was loaded \(slice 5 "):
        runtime(np.array([[5 * 64 + 3]]))


def test_a_tied_table_is_loaded_whole(tmp_path):
    model = tiny_model("olmoe", vocab_size=VOCAB, tie_word_embeddings=True)
    out = compile_model(model, target="host", out=tmp_path / "tied", progress=False)
    assert all(t.lookup_rows is None for w in read_manifest(out).weights for t in w.tensors)
    runtime = load_model(out)
    assert "lookup_tables" not in runtime.stats()
    tokens = np.array([[3, 900]])
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    assert relative_error(runtime(tokens), theirs) < 1e-4
