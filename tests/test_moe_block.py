"""A single MoE block (hidden states in, hidden states out) through the same pipeline."""

import numpy as np
import torch

from moetvm.artifact import read_manifest
from moetvm.compiler import compile_model
from moetvm.compiler.models.reference import MoEBlock
from moetvm.runtime import InputError, load_model

from moetvm.verify import relative_error


def test_moe_block_compiles_with_one_shared_workload(tmp_path):
    torch.manual_seed(1)
    block = MoEBlock(d_model=64, d_ff=96, n_experts=6, top_k=2).eval()
    out = compile_model(block, (torch.zeros(2, 5, 64),), target="host", out=tmp_path / "block", progress=False)
    manifest = read_manifest(out)
    assert manifest.kind == "moe_block"
    assert len(manifest.workloads) == 1  # 6 experts of one shape: one kernel
    assert [lib.name for lib in manifest.libraries] == ["routers", "expert_swiglu_64x96_fp32t32"]

    model = load_model(out, cache_budget="34%")  # two of six experts resident
    rng = np.random.default_rng()
    for shape in [(1, 1, 64), (2, 9, 64), (40, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
        ours = model(x)
        assert ours.shape == theirs.shape
        assert relative_error(ours, theirs) < 1e-5
    assert model.stats()["evictions"] > 0

    try:
        model(np.zeros((3, 65), np.float32))
    except InputError as e:
        assert "65" in str(e) and "64" in str(e)
    else:
        raise AssertionError("a wrong hidden size must be refused")
    try:
        model(np.zeros((3, 64), np.float64))
    except InputError as e:
        assert "float32" in str(e)
    else:
        raise AssertionError("a wrong dtype must be refused")
