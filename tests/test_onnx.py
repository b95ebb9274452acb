"""ONNX as a second front door (`moetvm compile model.onnx`) and per-part export (`moetvm export-onnx`)."""

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from moetvm.artifact import read_manifest
from moetvm.cli import main
from moetvm.compiler import compile_onnx
from moetvm.compiler.onnx_frontend import OnnxModelError, find_moe_blocks
from moetvm.runtime import InputError, load_model

from moetvm.verify import relative_error
from hf_models import tiny_model

MOETVM = Path(sys.executable).parent / "moetvm"


@pytest.fixture(scope="module")
def reference_onnx(tmp_path_factory, reference_model) -> Path:
    """The reference model as torch.onnx.export (dynamo) writes it, at token ids (1, 16)."""
    path = tmp_path_factory.mktemp("onnx") / "reference.onnx"
    with torch.no_grad():
        torch.onnx.export(reference_model, (torch.zeros(1, 16, dtype=torch.long),), str(path),
                          input_names=["tokens"], output_names=["logits"], dynamo=True)
    return path


@pytest.mark.slow
def test_onnx_export_of_reference_compiles_and_matches_pytorch(tmp_path, reference_onnx, reference_model):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["compile", str(reference_onnx), "--target", "host", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.kind == "graph"
    assert len(manifest.workloads) == 1  # 32 experts of one shape: one kernel
    assert sum(len(layer.experts) for layer in manifest.moe_layers) == 32
    assert len(list((out / "experts").rglob("*.safetensors"))) == 32
    assert [s.op for s in manifest.program] == ["segment", "moe"] * 4 + ["segment"]

    model = load_model(out, cache_budget="25%")  # 8 of 32 experts resident
    rng = np.random.default_rng(0)
    for _ in range(3):
        tokens = rng.integers(0, 256, (1, 16))
        with torch.no_grad():
            theirs = reference_model(torch.from_numpy(tokens)).numpy()
        assert relative_error(model(tokens), theirs) < 1e-4
    assert model.stats()["evictions"] > 0

    with pytest.raises(InputError, match=r"\[1, 16\]"):
        model(np.zeros((1, 17), np.int64))
    with pytest.raises(InputError, match="int64"):
        model(np.zeros((1, 16), np.float32))
    # Token ids index the embedding table: outside it is an error, not a clamped, quietly wrong answer.
    assert manifest.model.index_limits == {"tokens": 256}
    for bad in (256, -1):
        with pytest.raises(InputError, match=r"tokens: indices must be in \[0, 256\)"):
            model(np.full((1, 16), bad, np.int64))


@pytest.mark.slow
def test_export_onnx_parts_match_pytorch_in_onnxruntime(tmp_path):
    """`moetvm export-onnx` on a local transformers directory (Qwen2-MoE: routed experts and a
    gated shared expert of another shape, so two expert workloads)."""
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "qwen2-moe")
    out = tmp_path / "parts"
    run = subprocess.run([str(MOETVM), "export-onnx", str(out), "--model", f"hf:{tmp_path / 'qwen2-moe'}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    index = json.loads((out / "parts.json").read_text())
    kinds = [p["kind"] for p in index["parts"]]
    assert kinds == ["model"] + ["segment"] * 3 + ["router"] * 2 + ["expert"] * 2
    routed, shared = index["parts"][-2:]
    assert (routed["experts"], shared["experts"]) == (16, 2)
    assert [t["name"] for t in routed["inputs"]] == ["x", "w_gate", "w_up", "w_down"]
    for part in index["parts"]:
        assert (out / part["file"]).is_file()
        onnx.checker.check_model(str(out / part["file"]))
        assert part["max_relative_error"] < 1e-4, part
        assert part["part"] in run.stdout
    # The whole model it writes is what the ONNX front door takes.
    compile_onnx(out / "model.onnx", "host", tmp_path / "artifact", progress=False)


def test_export_onnx_refuses_layers_that_carry_a_state(tmp_path):
    """LFM2-MoE's convolution state has a TVM kernel, no ONNX translation: one line, exit 1,
    nothing written."""
    tiny_model("lfm2_moe").save_pretrained(tmp_path / "lfm2")
    run = subprocess.run([str(MOETVM), "export-onnx", str(tmp_path / "parts"), "--model", f"hf:{tmp_path / 'lfm2'}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == \
        "Error: Lfm2MoeForCausalLM: export-onnx does not write layers that carry a state (conv)"
    assert not (tmp_path / "parts").exists()


def export_hf_onnx(model: torch.nn.Module, path: Path, seq: int = 16) -> Path:
    """A transformers MoE model as torch.onnx.export (dynamo) writes it, at token ids (1, seq).
    Through HFCausalLM: eager attention and explicit masks (transformers' own mask builders add
    packed-sequence checks TVM rejects); `batched_mm` experts, the implementation that exports
    cleanly (the default grouped_mm exports a custom op and histc; eager's loop is data-dependent)."""
    from moetvm.compiler.models.hf import HFCausalLM

    model.set_experts_implementation("batched_mm")
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation noise; stdout holds the exporter's progress lines
        torch.onnx.export(HFCausalLM(model), (torch.zeros(1, seq, dtype=torch.long),), str(path),
                          input_names=["tokens"], output_names=["logits"], dynamo=True)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family,shared", [("mixtral", 0), ("olmoe", 0), ("qwen2_moe", 1), ("deepseek_v3", 1)])
def test_onnx_export_of_transformers_model_compiles_and_matches(tmp_path, family, shared):
    model = tiny_model(family)
    out = compile_onnx(export_hf_onnx(model, tmp_path / f"{family}.onnx"), "host", tmp_path / "artifact", progress=False)
    manifest = read_manifest(out)
    assert [s.op for s in manifest.program] == ["segment", "moe"] * 2 + ["segment"]
    assert [len(layer.experts) for layer in manifest.moe_layers] == [8, 8]
    assert [len(layer.shared) for layer in manifest.moe_layers] == [shared, shared]
    assert len(list((out / "experts").rglob("*.safetensors"))) == 2 * (8 + shared)

    runtime = load_model(out, cache_budget="30%")
    rng = np.random.default_rng(0)
    for _ in range(2):
        tokens = rng.integers(0, model.config.vocab_size, (1, 16))
        with torch.no_grad():
            theirs = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
        assert relative_error(runtime(tokens), theirs) < 1e-4
    assert runtime.stats()["evictions"] > 0


@pytest.fixture(scope="module")
def mixtral_onnx(tmp_path_factory) -> onnx.ModelProto:
    return onnx.load(str(export_hf_onnx(tiny_model("mixtral"), tmp_path_factory.mktemp("onnx") / "mixtral.onnx")))


def _first_block_node(model: onnx.ModelProto, op_type: str, scope: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type
                and any(p.key == "pkg.torch.onnx.name_scopes" and f"layers.0.mlp.{scope}'" in p.value for p in n.metadata_props))


@pytest.mark.parametrize("case,expected", [
    ("activation", "not a SwiGLU FFN"),
    ("scores", r"router logits go to \[.Relu.\], expected Softmax or Sigmoid"),
    ("top_k", "expected a TopK with a constant k"),
])
def test_transformers_block_that_cannot_be_read_is_refused(mixtral_onnx, case, expected):
    model = onnx.ModelProto()
    model.CopyFrom(mixtral_onnx)
    if case == "activation":  # a GELU-like expert: tanh where SiLU's sigmoid was
        _first_block_node(model, "Sigmoid", "experts").op_type = "Tanh"
    elif case == "scores":
        _first_block_node(model, "Softmax", "gate").op_type = "Relu"
    else:  # k computed at run time
        top = _first_block_node(model, "TopK", "gate")
        model.graph.node.append(helper.make_node("Identity", [top.input[1]], ["runtime_k"]))
        top.input[1] = "runtime_k"
    with pytest.raises(OnnxModelError, match=f"MoE block 'hf.model.layers.0.mlp': .*{expected}"):
        find_moe_blocks(model)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _matmul_graph(weight_name: str, extra: dict[str, np.ndarray] = ()) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), weight_name)
    inits = [w] + [numpy_helper.from_array(v, k) for k, v in dict(extra).items()]
    return helper.make_graph([helper.make_node("MatMul", ["x", weight_name], ["y"])], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)


@pytest.mark.parametrize("case", ["missing", "corrupt", "no_moe", "experts_without_router", "symbolic"])
def test_bad_onnx_inputs_give_clear_errors(tmp_path, case):
    if case == "missing":
        path, expected = tmp_path / "nothing.onnx", "no such ONNX file"
    elif case == "corrupt":
        path, expected = tmp_path / "corrupt.onnx", "not a valid ONNX model"
        path.write_bytes(b"\x08\x07garbage" * 50)
    elif case == "no_moe":
        path, expected = _save(_matmul_graph("dense.weight"), tmp_path / "dense.onnx"), "no MoE block recognised"
    elif case == "experts_without_router":
        expert = {f"blk.experts.0.{p}.weight": np.ones((4, 4), np.float32) for p in ("w_gate", "w_up", "w_down")}
        path = _save(_matmul_graph("dense.weight", expert), tmp_path / "half.onnx")
        expected = "'blk' looks like an MoE block but has no router weight"
    else:
        graph = _matmul_graph("dense.weight")
        graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        path, expected = _save(graph, tmp_path / "symbolic.onnx"), "--input-shape x=NxN"
    with pytest.raises(OnnxModelError, match=expected.replace("(", r"\(")):
        compile_onnx(path, "host", tmp_path / "out", progress=False)
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_input_shape_fixes_symbolic_dims(tmp_path):
    graph = _matmul_graph("dense.weight")
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = _save(graph, tmp_path / "symbolic.onnx")
    # The shape is accepted; the graph then fails for the next reason: it has no MoE block.
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "out"), "--input-shape", "x=2x4"])
    assert result.exit_code == 1 and "no MoE block recognised" in result.output
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "out"), "--input-shape", "x=2"])
    assert result.exit_code == 1 and "has 2 dimensions" in result.output
