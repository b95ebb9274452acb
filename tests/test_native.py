"""moetvm-run, the decoder without Python (runtime/native/moetvm_run.cc, scripts/build-native):
built from this checkout, run as its own process on real artifacts, and held to the Python
runtime's greedy tokens and to its refusals."""

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moetvm.artifact import FORMAT_VERSION, file_ref
from moetvm.compiler import compile_model
from moetvm.compiler.options import CompileOptions
from moetvm.runtime import load_model
from hf_models import greedy_ids, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "moetvm-run"
    proc = subprocess.run([REPO / "scripts" / "build-native", "-o", out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_native(native, artifact, ids, new=24, *extra, expect_ok=True):
    proc = subprocess.run([native, artifact, "--token-ids", ",".join(map(str, ids)), "--max-new-tokens", str(new),
                           "--ignore-eos", "--json", *extra], capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return proc


def test_shipped_model_decodes_as_the_python_runtime_and_pytorch(native, reference_artifact, reference_model,
                                                                 heldout_tokens):
    prompt = heldout_tokens[5000:5016].tolist()
    result = run_native(native, reference_artifact, prompt, 32)
    python = load_model(reference_artifact, cache_budget="100%").generate(prompt, 32, ignore_eos=True)
    assert result["new_ids"] == python == greedy_ids(reference_model, prompt, 32)
    assert result["prompt_tokens"] == 16 and result["decode_tokens"] == 31 and result["finish_reason"] == "length"
    assert result["peak_rss_mb"] > 0 and result["latency_ms"]["p50"] > 0


@pytest.mark.parametrize("length", [1, 300])
def test_a_prompt_of_one_token_or_of_several_chunks(native, reference_artifact, reference_model, heldout_tokens, length):
    """The prompt goes through the program 128 positions a call (300: three chunks, the last one
    short), or as one token, which takes the pooled VM's steady path: the same tokens either way."""
    prompt = heldout_tokens[7000:7000 + length].tolist()
    result = run_native(native, reference_artifact, prompt, 16)
    python = load_model(reference_artifact, cache_budget="100%").generate(prompt, 16, ignore_eos=True)
    assert result["new_ids"] == python == greedy_ids(reference_model, prompt, 16)
    assert result["prompt_tokens"] == length


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """A transformers OLMoE (untied embedding table) at fp32 and with the whole model at int4."""
    model = tiny_model("olmoe")
    root = tmp_path_factory.mktemp("olmoe")
    fp32 = compile_model(model, target="host", out=root / "fp32", progress=False)
    int4 = compile_model(model, target="host", out=root / "int4", options=CompileOptions(quant="int4"), progress=False)
    return model, fp32, int4


def test_transformers_model_decodes_as_the_python_runtime(native, olmoe):
    model, fp32, int4 = olmoe
    tables = [t for w in json.loads((fp32 / "manifest.json").read_text())["weights"] for t in w["tensors"]
              if t.get("lookup_rows")]
    assert tables  # its untied table is read by the slices the tokens reach
    prompt = np.random.default_rng(3).integers(0, 128, size=12).tolist()
    assert run_native(native, fp32, prompt, 24)["new_ids"] == greedy_ids(model, prompt, 24)
    # Quantized weights and scales in their pools' slots, the dense part's too: the same kernels
    # as the Python runtime's one-call step, so the same tokens.
    python = load_model(int4, cache_budget="100%").generate(prompt, 24, ignore_eos=True)
    assert run_native(native, int4, prompt, 24)["new_ids"] == python


def test_stops_at_the_end_of_sequence_id_unless_told(native, olmoe, tmp_path):
    from tokenizers import Tokenizer, models

    model, fp32, _ = olmoe
    prompt = [5, 9, 17, 3]
    first = greedy_ids(model, prompt, 1)[0]
    art = _copy(fp32, tmp_path)
    (art / "tokenizer").mkdir()
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    vocab.save(str(art / "tokenizer" / "tokenizer.json"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tokenizer"] = {"kind": "hf", "files": [dataclasses.asdict(file_ref(art, art / "tokenizer" / "tokenizer.json"))],
                             "eos_token_ids": [first], "special_tokens": {}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([native, art, "--token-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["new_ids"] == [first] == load_model(art, cache_budget="100%").generate(prompt, 8)
    assert result["finish_reason"] == "eos"
    assert run_native(native, art, prompt, 8)["new_ids"] == greedy_ids(model, prompt, 8)  # --ignore-eos


def _copy(artifact: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    return copy


def _refused(proc, *words):
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("moetvm-run: error: "), proc.stderr
    for word in words:
        assert word in line, line


def test_a_tampered_expert_is_refused_before_any_token(native, reference_artifact, tmp_path):
    art = _copy(reference_artifact, tmp_path)
    expert = sorted((art / "experts").rglob("*.safetensors"))[3]
    data = bytearray(expert.read_bytes())
    data[-5] ^= 0x40
    expert.write_bytes(bytes(data))
    _refused(run_native(native, art, [1, 2, 3], expect_ok=False), expert.relative_to(art).as_posix(), "SHA-256 mismatch")


def test_a_weight_file_whose_tensor_disagrees_with_the_manifest_is_refused(native, reference_artifact, tmp_path):
    art = _copy(reference_artifact, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    tensor = manifest["weights"][0]["tensors"][0]
    tensor["shape"] = [tensor["shape"][0] + 1, *tensor["shape"][1:]]
    (art / "manifest.json").write_text(json.dumps(manifest))
    _refused(run_native(native, art, [1, 2, 3], expect_ok=False), tensor["name"], "expected float32")


def test_bad_requests_and_uncovered_artifacts_get_one_line(native, reference_artifact, tmp_path):
    _refused(run_native(native, reference_artifact, [1, 256], expect_ok=False), "'256' is not in the vocabulary")
    _refused(run_native(native, tmp_path / "nothing", [1], expect_ok=False), "no such artifact directory")
    _refused(run_native(native, reference_artifact, [1], 100000, expect_ok=False), "exceeds the model's")
    art = _copy(reference_artifact, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["decode_step"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    _refused(run_native(native, art, [1], expect_ok=False), "no one-call decode step", "moetvm run")
    manifest["format_version"] = FORMAT_VERSION + 1
    (art / "manifest.json").write_text(json.dumps(manifest))
    _refused(run_native(native, art, [1], expect_ok=False), f"format {FORMAT_VERSION + 1}")


def test_a_kv_cache_that_is_not_in_place_is_refused_with_its_reason(native, tmp_path):
    # A sliding window compiles to the concat layout (the past keys and values passed in and out).
    out = compile_model(tiny_model("mixtral"), target="host", out=tmp_path / "a", progress=False)
    _refused(run_native(native, out, [1, 2], expect_ok=False), "KV cache is not in place", "moetvm run")


def test_reads_the_newest_artifact_format(native):
    proc = subprocess.run([native, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"-{FORMAT_VERSION})" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_board_build_decodes_the_cortex_a72_artifact_on_the_emulated_board(board, a72_artifact, reference_model,
                                                                           heldout_tokens, tmp_path):
    out = tmp_path / "moetvm-run"
    proc = subprocess.run([REPO / "scripts" / "build-native", "--board", "-o", out], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompt = heldout_tokens[5000:5016].tolist()
    sysroot = REPO / ".board" / "a72" / "sysroot"  # where the board fixture built it
    proc = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a72", "-L", sysroot, out, a72_artifact, "--token-ids",
                           ",".join(map(str, prompt)), "--max-new-tokens", "16", "--ignore-eos", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["new_ids"] == greedy_ids(reference_model, prompt, 16)
    host = out.with_name("host-moetvm-run")
    assert subprocess.run([REPO / "scripts" / "build-native", "-o", host], capture_output=True, timeout=600).returncode == 0
    _refused(run_native(host, a72_artifact, prompt, expect_ok=False), "built for aarch64, this machine is x86-64")


def test_the_build_never_replaces_a_file_that_is_not_its_own(tmp_path):
    mine = tmp_path / "moetvm-run"
    mine.write_text("a user's file")
    proc = subprocess.run([REPO / "scripts" / "build-native", "-o", mine], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "not a moetvm-run binary; not replacing it" in proc.stderr, proc.stderr
    assert mine.read_text() == "a user's file"
