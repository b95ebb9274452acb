"""The decode path at long context (issue 14): the KV-sized layout operations are views or
row-wise copies, not per-element index arithmetic, and a long greedy decode still matches
PyTorch token for token. Speed itself is measured by scripts, not asserted here."""

import numpy as np
import pytest
import torch
from tvm import relax, tirx

from moetvm.artifact import lm_io_names
from moetvm.compiler import find_moe_layers
from moetvm.compiler import frontend
from moetvm.compiler.dense_weights import store_dense_weights
from moetvm.compiler.quant import scheme
from moetvm.compiler.lowering import relax_pipeline
from moetvm.compiler.build_target import BuildTarget
from moetvm.runtime import load_model

from moetvm.verify import relative_error


@pytest.fixture(scope="module")
def lowered_segments(reference_model):
    """The reference model's segments as the host pipeline lowers them (before code generation)."""
    specs = find_moe_layers(reference_model)
    names_in, names_out = lm_io_names(reference_model.kv_layout[0])
    mod, dense = store_dense_weights(frontend.export_causal_lm(reference_model, specs), scheme("fp32"))
    split = frontend.split_at_moe_layers(mod, names_in, names_out, dense.names)
    target = BuildTarget.resolve("host").tvm
    with target:
        return relax_pipeline(target)(relax.transform.ConvertToDataflow()(split.segments))


def test_kv_layout_changes_are_views_not_kernels(lowered_segments):
    """torch's attention reshapes the (batch, heads, past, dim) cache and `expand`s it to the
    shape it already has; lowered naively each was a kernel copying the whole cache every token
    (1-4 ms each at 512 positions). Reshapes must be views, identity broadcasts gone."""
    kernels = [gv.name_hint for gv, f in lowered_segments.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert not [k for k in kernels if k.startswith(("reshape", "broadcast_to"))], kernels


@pytest.mark.slow
def test_long_greedy_decode_matches_pytorch(reference_artifact, reference_model, heldout_tokens):
    """320 decode steps (positions 32..351) through the runtime's KV cache: the same greedy tokens
    as PyTorch's full forward, and the last step's logits within 1e-4."""
    prompt = heldout_tokens[:32]
    model = load_model(reference_artifact, cache_budget="100%")
    ours = model.generate(prompt, 320)
    ids = torch.from_numpy(prompt[None])
    theirs = []
    with torch.no_grad():
        for _ in range(320):
            logits = reference_model(ids)[0, -1]
            theirs.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[theirs[-1]]])], dim=1)
    assert ours == theirs
    full = np.concatenate([prompt, np.array(ours[:-1])])[None]
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(full)).numpy()
    assert relative_error(model(full)[:, -1], expected[:, -1]) < 1e-4
