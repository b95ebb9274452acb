"""Bad input, as users and attackers give it: one line naming the problem, a non-zero exit, no
traceback, nothing of the user's destroyed, and no work done first (issue 13).

The CLI table runs the real command line in-process (click's runner: the same code path as the
`moetvm` script, without a Python start-up per case); a few cases that matter as processes run
as processes."""

import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from moetvm.artifact import ArtifactError, parse, read_manifest, sha256_file
from moetvm.cli import main
from moetvm.compiler.models import ASSETS
from moetvm.errors import MoetvmError
from moetvm.runtime import InputError, load_model


def cli(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(result, expected: str):
    __tracebackhide__ = True
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped as {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Things users point commands at by mistake."""
    root = tmp_path_factory.mktemp("inputs")
    text = root / "notes.txt"
    text.write_text("just some text\n")
    bare = root / "bare.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(bare))  # no reference-model metadata
    hf_dir = root / "hf-model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    empty = root / "empty.txt"
    empty.write_bytes(b"")
    tiny = root / "tiny.txt"
    tiny.write_bytes(b"def f(): pass\n")
    bad_targets = root / "targets.json"
    bad_targets.write_text("{not json")
    other_trace = root / "other.trace.npz"
    from moetvm.runtime.trace import TraceRecorder

    recorder = TraceRecorder([4, 4], {(layer, e): 100 for layer in range(2) for e in range(4)})
    recorder.record(0, np.array([[0, 1]]), np.array([[0.5, 0.5]]), None)
    recorder.end_step()
    recorder.to_trace().save(other_trace)
    return {"root": root, "text": text, "bare": bare, "hf_dir": hf_dir, "empty": empty, "tiny": tiny,
            "bad_targets": bad_targets, "other_trace": other_trace, "file_parent": text / "sub"}


RUN_CASES = [
    (["--token-ids", ""], "--token-ids: expected comma-separated integers"),
    (["--token-ids", "1,,2"], "--token-ids: expected comma-separated integers"),
    (["--token-ids", "9" * 30], "non-negative 64-bit integers"),
    (["--token-ids", "300"], "token ids must be in [0, 256)"),
    (["--prompt", "caf\udce9"], "--prompt: not valid UTF-8 text"),
    (["--max-new-tokens", "-1"], "-1 is not in the range"),
    (["--max-new-tokens", "600"], "the model has 512 (at most 509 new tokens)"),
    (["--cache-budget", "inf%"], "bad cache budget 'inf%'"),
    (["--cache-budget", "abc"], "bad cache budget 'abc'"),
    (["--cache-budget", "-5%"], "bad cache budget '-5%'"),
    (["--cache-budget", "0"], "bad cache budget '0'"),
    (["--cache-budget", "10B"], "below one expert"),
    (["--preload", "1.5"], "preload is a fraction of the experts in [0, 1]"),
    (["--preload", "1", "--cache-budget", "25%"], "leaves no room for other experts"),
    (["--storage-mbps", "0"], "storage throttle must be a positive number"),
    (["--storage-mbps", "-3"], "storage throttle must be a positive number"),
    (["--fallback", "dense"], "needs the dense stand-in experts"),
    (["--trusted-key", "/no/such.pem"], "does not exist"),
    (["--decrypt-key", "/no/such.key"], "does not exist"),
    (["--decrypt-key", str(ASSETS / "heldout.txt")], "a key file holds exactly 32 bytes"),
    (["--min-expert-weight", "1"], "1.0 is not in the range 0<=x<1"),
    (["--min-expert-weight", "-0.5"], "is not in the range"),
    (["--cache-budget", "60%..25%"], "the floor is above the ceiling"),
    (["--cache-budget", "25%..x"], "bad cache budget 'x'"),
    (["--expert-source", "ftp://x/"], "give an http(s) URL"),
    (["--expert-source", "http://127.0.0.1:1/", "--expert-store-budget", "0"], "bad expert store budget '0'"),
]


@pytest.mark.parametrize("args, expected", RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_run_refuses(reference_artifact, args, expected):
    assert_one_line_error(cli("run", reference_artifact, *args), expected)


def test_run_refuses_a_missing_artifact(tmp_path):
    assert_one_line_error(cli("run", tmp_path / "nothing"), "no such artifact directory")


@pytest.mark.slow
def test_run_names_the_machine_a_cross_compiled_artifact_is_for(a72_artifact):
    assert_one_line_error(cli("run", a72_artifact, "--max-new-tokens", "2"),
                          "built for aarch64, this machine is x86-64")


COMPILE_CASES = [
    (lambda f: ["reference", "-o", f["root"] / "a", "--routing", "cycle", "--cycle-dwell", "0"],
     "cycle dwell must be a positive number"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--routing", "tiling", "--tile", "0"],
     "tile must be a positive number"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--sign", "/missing.key"], "'/missing.key' does not exist"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--sign", f["text"]], "not a usable PEM Ed25519 private key"),
    (lambda f: [f["text"], "-o", f["root"] / "a"], "not a readable safetensors checkpoint"),
    (lambda f: [f["bare"], "-o", f["root"] / "a"], "bare.safetensors: a safetensors file without the reference model's"),
    (lambda f: [f["hf_dir"], "-o", f["root"] / "a"], f"for a transformers model directory write hf:"),
    (lambda f: ["nonsense", "-o", f["root"] / "a"], "not 'reference', 'hf:DIR' or an existing checkpoint"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--calibration", "/missing.txt"], "does not exist"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--calibration", f["empty"]], "at least 128 are needed"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--tuning-db", "/missing-db"], "does not exist"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--tuning-db", f["root"]], "not a tuning database"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--quant", "auto", "--weight-budget", "64XB"],
     "bad weight budget '64XB'"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--quant", "auto", "--weight-budget", "inf%"],
     "bad weight budget 'inf%'"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--mask-below", "2"], "mask below must be a share"),
    (lambda f: ["reference", "-o", f["file_parent"]], "cannot write in"),
    (lambda f: ["reference", "-o", "."], "give the artifact its own directory name"),
    (lambda f: ["reference", "-o", f["root"]], "not a moetvm artifact"),
    (lambda f: ["reference", "-o", f["text"]], "is an existing file"),
    (lambda f: [f["bare"], "-o", f["bare"]], "would replace the input"),
    (lambda f: ["model.onnx", "-o", f["root"] / "a"], "no such ONNX file"),
    (lambda f: ["model.onnx", "-o", f["root"] / "a", "--calibration", f["tiny"]], "not available for an ONNX"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--input-shape", "x=1x2"], "ONNX models only"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--target", "nowhere"], "unknown target 'nowhere'"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--target", "host", "--target", "host"], "each target once"),
    (lambda f: ["reference", "-o", f["text"], "--target", "host", "--target", "cortex-a72"],
     "several targets write a folder of artifacts"),
    (lambda f: ["model.onnx", "-o", f["root"] / "a", "--target", "host", "--target", "cortex-a72"],
     "compile an ONNX model once per target"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--encrypt-key", f["tiny"]], "a key file holds exactly 32 bytes"),
    (lambda f: ["reference", "-o", f["root"] / "a", "--encrypt-key", "/missing.key"], "'/missing.key' does not exist"),
]


@pytest.mark.parametrize("make_args, expected", COMPILE_CASES, ids=[e for _, e in COMPILE_CASES])
def test_compile_refuses_before_any_work(files, make_args, expected):
    before = {p: sha256_file(p) for p in files["root"].rglob("*") if p.is_file()}
    assert_one_line_error(cli("compile", *make_args(files)), expected)
    after = {p: sha256_file(p) for p in files["root"].rglob("*") if p.is_file()}
    assert after == before  # nothing of the user's touched, nothing left behind
    assert not (files["root"] / "a").exists()


def test_compile_refuses_bad_targets_files(files):
    env = {"MOETVM_TARGETS": str(files["bad_targets"])}
    assert_one_line_error(cli("compile", "reference", "-o", files["root"] / "a", env=env), "not valid JSON")
    env = {"MOETVM_TARGETS": str(files["root"] / "missing.toml")}
    assert_one_line_error(cli("targets", env=env), "cannot read the targets file")


def test_output_is_replaced_only_when_it_is_our_artifact(reference_artifact, tmp_path):
    """-o over a directory of the user's files, over a file, over the input checkpoint, over the
    working directory: all refused, all left as they were. Over an artifact: replaced."""
    from moetvm.output import OutputError, check_output

    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    for path, why in [(user_dir, "not a moetvm artifact"), (user_dir / "thesis.tex", "existing file"),
                      (Path.cwd(), "current directory"), (tmp_path / "link", "symbolic link")]:
        if why == "symbolic link":
            path.symlink_to(reference_artifact, target_is_directory=True)
        with pytest.raises(OutputError, match=why):
            check_output(path)
    assert (user_dir / "thesis.tex").read_text() == "years of work"
    with pytest.raises(OutputError, match="would replace the input"):
        check_output(tmp_path / "new", inputs=(tmp_path / "new" / "model.safetensors",))

    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    assert check_output(artifact) == artifact  # ours: may be replaced
    (artifact / "notes.md").write_text("mine")  # ...until the user puts something of theirs in it
    with pytest.raises(OutputError, match="'notes.md', which its manifest does not list"):
        check_output(artifact)
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty")


def test_a_failed_compile_leaves_the_good_artifact(reference_model, reference_artifact, tmp_path):
    """A new artifact that fails validation at the very end, and a compile refused up front,
    both leave the old artifact byte for byte and no temp directory behind."""
    from moetvm.compiler import compile_model
    from moetvm.output import atomic_directory

    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    before = {p.name: sha256_file(p) for p in artifact.rglob("*") if p.is_file()}

    def refuse(root):
        parse((root / "manifest.json").read_bytes())  # an empty manifest: not JSON

    with pytest.raises(ArtifactError, match="not valid JSON"):
        with atomic_directory(artifact, validate=refuse) as tmp:
            (tmp / "manifest.json").write_text("")
    assert {p.name: sha256_file(p) for p in artifact.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    with pytest.raises(MoetvmError, match="cycle dwell must be a positive"):
        compile_model(reference_model, out=artifact, routing="cycle", cycle_dwell=0, progress=False)
    assert {p.name: sha256_file(p) for p in artifact.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_signed_compile_is_signed_before_it_lands(reference_model, tmp_path):
    from moetvm.signing import generate_keypair, verify_artifact
    from moetvm.compiler import compile_model

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    out = compile_model(reference_model, out=tmp_path / "signed", progress=False, sign_key=tmp_path / "k.pem")
    assert verify_artifact(out, tmp_path / "k.pub")
    load_model(out, trusted_keys=[tmp_path / "k.pub"])


@pytest.mark.parametrize("args, expected", [
    (["--windows", "0"], "0 is not in the range"),
    (["--text", "/no/such.txt"], "does not exist"),
    (["--model", "/no/such.safetensors"], "not 'reference', 'hf:DIR' or an existing checkpoint"),
    (["--tolerance", "0"], "--tolerance must be positive"),
])
def test_verify_refuses(reference_artifact, args, expected):
    assert_one_line_error(cli("verify", reference_artifact, *args), expected)


def test_verify_refuses_tiny_texts_and_non_lm_artifacts(reference_artifact, block_artifact, files):
    assert_one_line_error(cli("verify", reference_artifact, "--text", files["tiny"]), "at least 129 are needed")
    assert_one_line_error(cli("verify", block_artifact[0]), "this is a moe_block artifact")


@pytest.mark.slow
def test_verify_judges_a_quantized_artifact_by_its_precision(reference_model, tmp_path):
    from moetvm.compiler import compile_model

    out = compile_model(reference_model, out=tmp_path / "int8", quant="int8", source="reference", progress=False)
    # 24 windows (3,072 tokens): int8 agrees on 99.4% of them on an AVX512-VNNI Xeon (integer dots),
    # above the 99% bound and below the strict 100% asked next. 4 windows were too few: 99.2% on an
    # AMD Zen 3 (fp32 products), 98.8% (6 of 512 tokens) on the Xeon.
    result = cli("verify", out, "--windows", "24", "--generate", "4", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"], report
    assert report["precision"] == "int8" and report["min_agreement"] == 0.99
    assert report["argmax_agreement"] >= 0.99
    strict = cli("verify", out, "--windows", "4", "--generate", "4", "--min-agreement", "1.0")
    assert strict.exit_code == 1 and "MISMATCH (int8: top-1 agreement >= 100.0%)" in strict.output


def test_trace_and_simulate_refuse(reference_artifact, files, tmp_path):
    trace = ASSETS / "heldout.trace"
    cases = [
        (["trace", reference_artifact, "--text", "/no/such.txt", "-o", tmp_path / "t"], "does not exist"),
        (["trace", reference_artifact, "--text", tmp_path, "-o", tmp_path / "t"], "is a directory"),
        (["trace", reference_artifact, "--text", files["text"], "--window", "0", "-o", tmp_path / "t"],
         "0 is not in the range"),
        (["trace", reference_artifact, "--text", files["text"], "-o", tmp_path], "is a directory"),
        (["trace", reference_artifact, "--text", files["empty"], "-o", tmp_path / "t"], "empty"),
        (["trace", reference_artifact, "--text", files["tiny"], "-o", files["text"]], "is not a routing trace"),
        (["simulate", "/no/such.trace"], "does not exist"),
        (["simulate", tmp_path], "is a directory"),
        (["simulate", files["text"]], "not a routing trace file"),
        (["simulate", trace, "--budget", "abc"], "bad cache budget 'abc'"),
        (["simulate", trace, "--budget", "0"], "bad cache budget '0'"),
        (["simulate", trace, "--budget", "-5%"], "bad cache budget '-5%'"),
        (["simulate", trace, "--budget", "25%", "--budget", "nope"], "bad cache budget 'nope'"),
        (["simulate", trace, "--profile", files["other_trace"]], "the profile trace is of another model"),
    ]
    for args, expected in cases:
        assert_one_line_error(cli(*args), expected)
    assert not (tmp_path / "t").exists()


def test_export_onnx_keygen_inspect_diff_refuse(files, tmp_path, reference_artifact):
    cases = [
        (["export-onnx", tmp_path / "x", "--shape", "0x16"], "batch and sequence must be at least 1"),
        (["export-onnx", tmp_path / "x", "--shape", "banana"], "--shape takes BATCHxSEQ"),
        (["export-onnx", files["text"]], "is a file; export-onnx writes into a directory"),
        (["export-onnx", files["root"]], "not an earlier export (no parts.json)"),
        (["keygen", files["file_parent"] / "k.pem", tmp_path / "k.pub"], "notes.txt is not a directory"),
        (["inspect", tmp_path], "no manifest"),
        (["diff", reference_artifact, tmp_path], "no manifest"),
    ]
    for args, expected in cases:
        assert_one_line_error(cli(*args), expected)


def test_version_and_one_error_root():
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("moetvm, version ")
    from moetvm.budget import BudgetError
    from moetvm.compiler.models import ModelSourceError
    from moetvm.compiler.onnx_frontend import OnnxModelError
    from moetvm.output import OutputError
    from moetvm.compiler.quant import QuantizationError
    from moetvm.compiler.spec import UnsupportedModelError
    from moetvm.compiler.tuning import TuningError
    from moetvm.runtime.remote import DeployError
    from moetvm.runtime.trace import TraceError
    from moetvm.signing import SignatureError
    from moetvm.targets import TargetError

    for cls in (ArtifactError, BudgetError, DeployError, InputError, ModelSourceError, OnnxModelError, OutputError,
                QuantizationError, SignatureError, TargetError, TraceError, TuningError, UnsupportedModelError):
        assert issubclass(cls, MoetvmError), cls


# --- the Python API ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def block_artifact(tmp_path_factory):
    """The README's single-block example, with a batch-1 example input (torch.export used to
    specialise that dimension and refuse)."""
    from moetvm.compiler import compile_model
    from moetvm.compiler.models.reference import MoEBlock

    torch.manual_seed(3)
    block = MoEBlock(d_model=32, d_ff=48, n_experts=4, top_k=2).eval()
    out = compile_model(block, (torch.zeros(1, 5, 32),), target="host",
                        out=tmp_path_factory.mktemp("block") / "block", progress=False)
    return out, block


def test_block_compiled_from_a_batch_one_example_runs_any_batch(block_artifact):
    artifact, block = block_artifact
    model = load_model(artifact)
    for shape in [(1, 1, 32), (3, 7, 32)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
        assert np.abs(model(x) - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_api_refusals(reference_model, reference_artifact, block_artifact, tmp_path):
    from moetvm.compiler import compile_model
    from moetvm.compiler.models.reference import MoEBlock

    block = MoEBlock(d_model=32, d_ff=48, n_experts=4, top_k=2).eval()
    with pytest.raises(MoetvmError, match="needs example_inputs=\\(hidden,\\)"):
        compile_model(block, out=tmp_path / "b", progress=False)
    with pytest.raises(MoetvmError, match=r"got \(ndarray\)"):
        compile_model(block, (np.zeros((2, 5, 32), np.float32),), out=tmp_path / "b", progress=False)
    with pytest.raises(MoetvmError, match="torch.nn.Module"):
        compile_model("reference", out=tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="generate needs a causal LM artifact; this one is a moe_block"):
        load_model(block_artifact[0]).generate([1, 2, 3], 4)
    lm = load_model(reference_artifact)
    with pytest.raises(InputError, match=r"generate takes one prompt .* got shape \(2, 3\)"):
        lm.generate([[1, 2, 3], [4, 5, 6]], 4)
    with pytest.raises(InputError, match="max_new_tokens must be a non-negative integer"):
        lm.generate([1, 2, 3], -1)
    with pytest.raises(InputError, match="at most 510 new tokens"):
        lm.generate([1, 2, 3], 511)
    with pytest.raises(InputError, match="token ids must be integers"):
        lm.generate([10**30], 2)
    assert len(lm.generate([[1, 2, 3]], 2)) == 2  # a (1, seq) batch of one is one prompt
    assert load_model(reference_artifact, cache_budget="100%", preload=1.0).stats()["preloaded"] == 32


def test_fallbacks_are_reported_in_the_text_report(reference_artifact, tmp_path, capsys):
    from moetvm.cli import print_run_report

    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    model = load_model(artifact, cache_budget="13%", fallback="skip")
    for layer in range(4):
        path = artifact / "experts" / f"layer{layer}" / "expert3.safetensors"
        path.write_bytes(path.read_bytes()[:-10])  # damaged after load
    model.generate(list(b"def main():\n    return "), 24)
    print_run_report(model.stats(), "skip")
    err = capsys.readouterr().err
    assert "FALLBACKS" in err and "served by --fallback skip" in err and "expert3" in err


# --- the manifest and the files it names, as untrusted input ----------------------------------
def test_manifest_symlink_nan_and_huge_shapes_refused(reference_artifact, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    text = (artifact / "manifest.json").read_text()
    outside = tmp_path / "outside.json"
    outside.write_text(text)
    (artifact / "manifest.json").unlink()
    (artifact / "manifest.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="is a symbolic link"):
        load_model(artifact)
    with pytest.raises(ArtifactError, match="is a symbolic link"):
        read_manifest(artifact)

    data = json.loads(text)
    data["moe_layers"][0]["experts"][0]["usage"] = float("nan")
    with pytest.raises(ArtifactError, match="NaN is not a JSON number"):
        parse(json.dumps(data))
    manifest = parse(text)
    import dataclasses

    bad = dataclasses.replace(manifest, compile_info={"x": float("inf")})
    with pytest.raises(ArtifactError, match="cannot be written as JSON"):
        bad.to_json()

    data = json.loads(text)
    data["workloads"][0]["params"][0]["shape"] = [10**12, 128]
    with pytest.raises(ArtifactError, match="unusable shape"):
        parse(json.dumps(data))
    data = json.loads(text)
    data["workloads"][0]["params"][0]["shape"][0] *= 2  # plausible, but more than the files hold
    with pytest.raises(ArtifactError, match="its workload's tensors take"):
        parse(json.dumps(data))


def test_compile_options_are_one_checked_object(reference_model, tmp_path):
    """CompileOptions is checked when made; compile_model's keywords are its fields (an unknown
    one is named), replace those of an options object, and an option needing calibration tokens
    is refused before any work when none are given."""
    import dataclasses

    from moetvm.compiler import CompileOptions, compile_model

    assert CompileOptions.of(CompileOptions(quant="int8"), group_size=64) == CompileOptions(quant="int8", group_size=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CompileOptions().quant = "int4"
    with pytest.raises(MoetvmError, match="tile must be a positive number"):
        CompileOptions(routing="tiling", tile=0)
    with pytest.raises(MoetvmError, match="quant auto needs a --weight-budget"):
        CompileOptions(quant="auto")
    with pytest.raises(MoetvmError, match="unknown compile option quantization; the options are"):
        compile_model(reference_model, out=tmp_path / "a", quantization="int4", progress=False)
    for option in ({"routing": "hash"}, {"mask_below": 0.1}, {"quant": "auto", "weight_budget": "50%"}):
        with pytest.raises(MoetvmError, match="needs calibration tokens to fit on"):
            compile_model(reference_model, out=tmp_path / "a", progress=False, **option)
    assert not (tmp_path / "a").exists()


def test_empty_calibration_is_refused_not_written_as_nan(reference_model, files, tmp_path):
    from moetvm.compiler import compile_model

    with pytest.raises(MoetvmError, match="calibration must be token windows"):
        compile_model(reference_model, out=tmp_path / "a", calibration=np.zeros((0, 128), np.int64), progress=False)
    assert_one_line_error(cli("compile", "reference", "-o", tmp_path / "a", "--calibration", files["empty"]),
                          "0 bytes, at least 128 are needed")


# --- load exactly the bytes verified ----------------------------------------------------------
@contextmanager
def swapping(target: Path, sources):
    """A thread replacing `target` with each of `sources` in turn, atomically, as fast as it can."""
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            for source in sources:
                shutil.copy(source, target.with_name(".next"))
                os.replace(target.with_name(".next"), target)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        yield
    finally:
        stop.set()
        swapper.join()


EVIL_LIBRARY = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen(getenv("MOETVM_EVIL_MARKER"), "a");
    if (f) { fputs("ran\n", f); fclose(f); }
}
"""


def test_a_library_swapped_after_the_check_is_never_loaded(reference_artifact, tmp_path):
    """An attacker swaps an expert library between the good file and an unsigned library whose
    constructor leaves a mark, as fast as they can, while the model loads with trusted keys:
    the loader reads each file once and loads what it hashed, so the evil constructor never runs
    and every load either gets the good library or is refused by its hash."""
    from moetvm.signing import generate_keypair, sign_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    sign_artifact(artifact, tmp_path / "k.pem")
    (tmp_path / "evil.c").write_text(EVIL_LIBRARY)
    evil = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", evil, tmp_path / "evil.c"], check=True)
    marker = tmp_path / "marker"
    os.environ["MOETVM_EVIL_MARKER"] = str(marker)
    target = next((artifact / "lib").glob("expert_*.so"))
    good = tmp_path / "good.so"
    shutil.copy(target, good)
    outcomes = {"loaded": 0, "refused": 0}
    try:
        with swapping(target, (evil, good)):
            for _ in range(40):
                try:
                    model = load_model(artifact, trusted_keys=[tmp_path / "k.pub"])
                    model(np.array([[1, 2, 3]]))
                    outcomes["loaded"] += 1
                except ArtifactError as e:
                    assert target.name in str(e)
                    outcomes["refused"] += 1
    finally:
        del os.environ["MOETVM_EVIL_MARKER"]
    assert not marker.exists(), "an unverified library's constructor ran"
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 40, outcomes


def test_an_expert_swapped_after_the_check_is_never_used(reference_artifact, tmp_path):
    """Expert weights are read once and parsed from the bytes hashed: a file swapped between a
    good expert and another valid safetensors file gives the good weights or a refusal."""
    artifact = tmp_path / "artifact"
    shutil.copytree(reference_artifact, artifact)
    target = artifact / "experts" / "layer0" / "expert0.safetensors"
    good = tmp_path / "good.safetensors"
    shutil.copy(target, good)
    forged = tmp_path / "forged.safetensors"
    shutil.copy(artifact / "experts" / "layer0" / "expert1.safetensors", forged)  # valid, same shapes
    from safetensors.numpy import load_file

    manifest = read_manifest(artifact)
    expert = manifest.moe_layers[0].experts[0]
    expected = [load_file(str(good))[t.name] for t in manifest.workload(expert.workload).params]
    model = load_model(artifact, cache_budget=expert.weight_bytes)  # every fetch of expert 0 is a fresh load
    refused = used = 0
    with swapping(target, (forged, good)):
        for _ in range(300):
            model.cache.get((0, 1))  # evicts expert 0
            try:
                value = [t.numpy() for t in model.cache.get((0, 0))]
            except ArtifactError:
                refused += 1
                continue
            used += 1
            assert all(np.array_equal(a, b) for a, b in zip(value, expected)), "forged weights were used"
    assert refused > 0 and used > 0


def test_bundle_commands_refuse(reference_artifact, files, tmp_path):
    assert_one_line_error(cli("pack", files["root"], "-o", tmp_path / "b"), "not a moetvm artifact")
    assert_one_line_error(cli("pack", reference_artifact, "-o", files["text"]), "already exists; refusing to replace it")
    assert_one_line_error(cli("unpack", files["text"], "-o", tmp_path / "x"), "not a readable moetvm bundle")
    assert_one_line_error(cli("unpack", tmp_path / "none", "-o", tmp_path / "x"), "no such bundle file")
    assert_one_line_error(cli("update", files["root"], files["text"]), "cannot be updated")
    assert_one_line_error(cli("serve-experts", files["root"]), "no manifest (not a moetvm artifact directory?)")
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
