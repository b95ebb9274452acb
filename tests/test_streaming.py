"""Compiling transformers checkpoints by streaming them (compiler/checkpoint.py): sharded bf16
safetensors made by scripts/make_checkpoint.py (tensor by tensor, the hub's key layouts), compiled
one tensor at a time and checked against transformers; the compile's peak memory measured in its
own process; a killed compile resumed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "hidden_size=64", "--set", "intermediate_size=32", "--set", "vocab_size=256",
        "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2", "--set", "num_experts_per_tok=2", "--layers", "2"]
EXPERTS = {"olmoe-1b-7b": "num_experts", "mixtral-8x7b": "num_local_experts", "granite-3.1-1b-a400m": "num_local_experts",
           "gpt-oss-20b": "num_local_experts", "granite-4.0-h-tiny": "num_local_experts"}
SHAPE_SETTINGS = {
    # a limit low enough to clamp, a window shorter than the prompt (a sliding and a full layer)
    "gpt-oss-20b": ["--set", "head_dim=16", "--set", "swiglu_limit=0.5", "--set", "sliding_window=4"],
    "granite-4.0-h-tiny": ["--set", 'layer_types=["linear_attention","full_attention"]', "--set", "mamba_n_heads=4",
                           "--set", "mamba_d_head=32", "--set", "mamba_d_state=16", "--set", "shared_intermediate_size=32"],
}


def make_checkpoint(out: Path, shape: str, *args: str) -> Path:
    """scripts/make_checkpoint.py, run in this process (torch and transformers are loaded already)."""
    spec = importlib.util.spec_from_file_location("make_checkpoint", REPO / "scripts" / "make_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(out), "--shape", shape, *args]) == 0
    return out


def compile_cli(model: Path, out: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moetvm.cli", "compile", f"hf:{model}", "-o", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("shape", sorted(EXPERTS))
def test_streamed_bf16_checkpoint_matches_transformers(shape, tmp_path):
    """Key layouts: per-expert gate/up/down (OLMoE), renamed per-expert w1/w3/w2 (Mixtral),
    fused and renamed input_linear/output_linear (GraniteMoE), fused gate/up columns interleaved
    with biases (GPT-OSS), Mamba2 mixers beside attention (Granite-4.0-H); bf16 shards, tied and
    untied heads. (LFM2-MoE streams in the next test.)"""
    import transformers

    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.runtime import load_model

    ckpt = make_checkpoint(tmp_path / "ckpt", shape, *TINY, *SHAPE_SETTINGS.get(shape, []), "--set", f"{EXPERTS[shape]}=8",
                           "--shard-size", "0.0001")
    assert len(list(ckpt.glob("*.safetensors"))) > 1  # sharded, with its index
    model = load_model_source(f"hf:{ckpt}", stream=True)
    assert model.streamed
    art = compile_model(model, target="host", out=tmp_path / "art", progress=False)
    tokens = np.array([[1, 7, 42, 255, 3, 99]], dtype=np.int64)
    ours = load_model(art)(tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()  # bf16 -> fp32: exact
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(ours - want).max() / np.abs(want).max() < 1e-4  # fp32 ≈ 1e-5 relative; observed ~3e-7


@pytest.mark.parametrize("family", ["lfm2_moe", "nemotron_h"])
def test_streamed_model_reads_its_buffers_from_the_checkpoint(family, tmp_path):
    """LFM2-MoE and NemotronH keep their experts' selection bias in a persistent buffer, not a
    parameter: a streamed compile reads it from the checkpoint (left at its initial zeros, LFM2
    routed tokens to other experts: relative error 1.4). NemotronH's checkpoint also holds its
    gateless experts one key per expert under `backbone.`, read one expert at a time."""
    from hf_models import tiny_model

    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.runtime import load_model

    model = tiny_model(family)  # its bias drawn N(0, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    art = compile_model(load_model_source(f"hf:{tmp_path / 'ckpt'}", stream=True), target="host", out=tmp_path / "art",
                        progress=False)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 16))
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(load_model(art)(tokens) - want).max() / np.abs(want).max() < 1e-4


def test_streamed_model_refuses_calibration(tmp_path):
    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.errors import UsageError

    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", *TINY, "--set", "num_experts=4")
    with pytest.raises(UsageError, match="calibration .* runs the PyTorch model"):
        compile_model(load_model_source(f"hf:{ckpt}", stream=True), target="host", out=tmp_path / "a", progress=False,
                      calibration=np.zeros((1, 8), np.int64))


# The CLI in this process, then its own peak RSS on stderr: VmHWM, the high-water mark of this
# program's memory. Not getrusage's ru_maxrss, which Linux carries across fork and exec: it gave
# this pytest worker's RSS at the fork (1.1-3.9 GB, by which tests the worker had run before).
PEAK_CLI = """
import sys
from moetvm.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK", hwm * 1024, file=sys.stderr)
"""


@pytest.mark.slow
def test_streamed_compile_is_bounded_and_resumes(tmp_path):
    """One checkpoint (2 layers x 128 experts, 0.8B parameters: 3.2 GB in fp32): a compile killed
    mid-way resumes from the experts it wrote and ends with the same manifest, byte for byte, as a
    clean compile, whose peak RSS (its own process) stays well below the fp32 size."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", "--set", "hidden_size=1024", "--set", "intermediate_size=1024",
                           "--set", "vocab_size=1024", "--set", "num_attention_heads=8", "--set", "num_key_value_heads=8",
                           "--set", "num_experts=128", "--layers", "2")
    fp32_bytes = 2 * sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert fp32_bytes > 3e9
    out, store = tmp_path / "art", tmp_path / ".art.partial"
    proc = compile_cli(ckpt, out, "--quant", "int4", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(store.glob("*.safetensors"))) < 40:
        time.sleep(0.02)
    assert proc.poll() is None, "the compile ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(store.glob("*.safetensors")))
    assert 40 <= kept < 2 * 128 and not out.exists()  # killed mid-way: the output was never touched

    resumed = compile_cli(ckpt, out, "--quant", "int4")
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert f"({kept} reused)" in err, err[-1500:]
    assert not store.exists()  # served, then removed

    clean = subprocess.run([sys.executable, "-c", PEAK_CLI, "compile", f"hf:{ckpt}", "-o", str(tmp_path / "clean"),
                            "--quant", "int4", "--quiet"], capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert (out / "manifest.json").read_text() == (tmp_path / "clean" / "manifest.json").read_text()
    peak = int(next(line.split()[1] for line in clean.stderr.splitlines() if line.startswith("PEAK")))
    # Observed 0.73 GB for 3.3 GB of fp32 weights: the working set is the runtime's libraries and a
    # few experts, whatever the model's size.
    print(f"streamed compile peak RSS {peak / 1e9:.2f} GB for {fp32_bytes / 1e9:.2f} GB of fp32 weights")
    assert peak < 0.4 * fp32_bytes


def test_keep_the_checkpoints_precision(tmp_path):
    """--quant keep: a bf16 checkpoint's weights are stored as bf16, the dense part too, and give
    transformers' logits but for the fp16 KV cache's rounding."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", *TINY, "--set", "num_experts=4")
    proc = compile_cli(ckpt, tmp_path / "art", "--quant", "keep", "--quiet")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["compile_info"]["quant"]["dense"].startswith("bf16")
    assert {e["workload"].split("_")[-1][:4] for layer in manifest["moe_layers"] for e in layer["experts"]} == {"bf16"}
    import transformers

    from moetvm.runtime import load_model

    tokens = np.array([[1, 7, 42, 255, 3, 99]], dtype=np.int64)
    ours = load_model(tmp_path / "art")(tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    # the weights are the checkpoint's own bytes: the error is the fp16 KV cache's
    assert np.abs(ours - want).max() / np.abs(want).max() < 1e-2
    # A runtime process of its own imports ml_dtypes only when it meets the bfloat16 weights (tvm_ffi's
    # import of it is blocked: runtime/__init__.py), and gives the same logits.
    script = ("import sys, numpy as np\nfrom moetvm.runtime import load_model\nbefore = 'ml_dtypes' in sys.modules\n"
              "np.save(sys.argv[2], load_model(sys.argv[1])(np.array([[1, 7, 42, 255, 3, 99]])))\n"
              "print(before, 'ml_dtypes' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "art"), str(tmp_path / "logits.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ours, rtol=1e-6, atol=1e-6 * np.abs(ours).max())


def test_targets_share_one_read_of_the_checkpoint(tmp_path):
    """`--target host --target cortex-a72`: an artifact per target, each byte for byte what its
    own compile makes (each in its target's layout: dot-product tiles on a host with them, plain
    tiles on the A72), while every weight is read from the checkpoint and quantized once: the second target
    finds every expert's numbers made, and the shared numbers are gone at the end."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", *TINY, "--set", "num_experts=4")
    both = tmp_path / "both"
    proc = compile_cli(ckpt, both, "--target", "host", "--target", "cortex-a72", "--quant", "int4")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "experts 8/8 (8 quantized for an earlier target)" in err, err[-1500:]
    assert sorted(p.name for p in both.iterdir()) == ["cortex-a72", "host"]  # .quantized.partial has served
    alone = compile_cli(ckpt, tmp_path / "a72", "--target", "cortex-a72", "--quant", "int4", "--quiet")
    _, err = alone.communicate(timeout=600)
    assert alone.returncode == 0, err
    ours = {p.relative_to(both / "cortex-a72"): p.read_bytes() for p in (both / "cortex-a72").rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp_path / "a72"): p.read_bytes() for p in (tmp_path / "a72").rglob("*") if p.is_file()}
    assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours)
