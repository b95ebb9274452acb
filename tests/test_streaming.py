"""Compiling transformers checkpoints by streaming them (compiler/checkpoint.py): sharded bf16
safetensors made by scripts/make_checkpoint.py (tensor by tensor, the hub's key layouts), compiled
one tensor at a time and checked against transformers; the compile's peak memory measured in its
own process; a killed compile resumed."""

from __future__ import annotations

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
EXPERTS = {"olmoe-1b-7b": "num_experts", "mixtral-8x7b": "num_local_experts", "granite-3.1-1b-a400m": "num_local_experts"}


def make_checkpoint(out: Path, shape: str, *args: str) -> Path:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_checkpoint.py"), str(out), "--shape", shape, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def compile_cli(model: Path, out: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moetvm.cli", "compile", f"hf:{model}", "-o", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("shape", sorted(EXPERTS))
def test_streamed_bf16_checkpoint_matches_transformers(shape, tmp_path):
    """Three key layouts: per-expert gate/up/down (OLMoE), renamed per-expert w1/w3/w2 (Mixtral),
    fused and renamed input_linear/output_linear (GraniteMoE); bf16 shards, tied and untied heads."""
    import transformers

    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.runtime import load_model

    ckpt = make_checkpoint(tmp_path / "ckpt", shape, *TINY, "--set", f"{EXPERTS[shape]}=8", "--shard-size", "0.0001")
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


def test_streamed_model_refuses_calibration(tmp_path):
    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.errors import UsageError

    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", *TINY, "--set", "num_experts=4")
    with pytest.raises(UsageError, match="calibration .* runs the PyTorch model"):
        compile_model(load_model_source(f"hf:{ckpt}", stream=True), target="host", out=tmp_path / "a", progress=False,
                      calibration=np.zeros((1, 8), np.int64))


PEAK_SCRIPT = """
import resource, sys
from moetvm.compiler import compile_model
from moetvm.compiler.models import load_model_source
compile_model(load_model_source("hf:" + sys.argv[1], stream=True), target="host", out=sys.argv[2], quant="int4", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_compile_bytes(ckpt: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt), str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_streamed_compile_memory_is_bounded(tmp_path):
    """The peak RSS of a compile (its own process) stays well below the model's fp32 size, and
    grows by little when the experts per layer double."""
    shape = ["--set", "hidden_size=1024", "--set", "intermediate_size=512", "--set", "vocab_size=4096",
             "--set", "num_attention_heads=8", "--set", "num_key_value_heads=8", "--layers", "2"]
    peaks, sizes = {}, {}
    for experts in (64, 128):
        ckpt = make_checkpoint(tmp_path / f"ckpt{experts}", "olmoe-1b-7b", *shape, "--set", f"num_experts={experts}")
        sizes[experts] = 2 * sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))  # fp32 = 2x bf16
        peaks[experts] = _peak_compile_bytes(ckpt, tmp_path / f"art{experts}")
    assert sizes[128] > 1.6e9  # 0.8B parameters at 128 experts
    assert peaks[128] < 0.5 * sizes[128], (peaks, sizes)  # observed: see the README (streamed compiles)
    assert peaks[128] < 1.1 * peaks[64], peaks  # the goal: < 10% more for twice the experts


@pytest.mark.slow
def test_killed_compile_resumes_with_the_same_hashes(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", "--set", "hidden_size=512", "--set", "intermediate_size=512",
                           "--set", "vocab_size=1024", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4",
                           "--set", "num_experts=64", "--layers", "3")
    out = tmp_path / "art"
    store = tmp_path / ".art.partial"
    proc = compile_cli(ckpt, out, "--quant", "int4", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(store.glob("*.safetensors"))) < 40:
        time.sleep(0.02)
    assert proc.poll() is None, "the compile ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(store.glob("*.safetensors")))
    assert 40 <= kept < 3 * 64 and not out.exists()  # killed mid-way: the output was never touched

    resumed = compile_cli(ckpt, out, "--quant", "int4")
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert f"({kept} reused)" in err or f"{kept} reused" in err, err[-1500:]
    assert not store.exists()  # served, then removed

    clean = compile_cli(ckpt, tmp_path / "clean", "--quant", "int4")
    _, err = clean.communicate(timeout=900)
    assert clean.returncode == 0, err
    assert (out / "manifest.json").read_text() == (tmp_path / "clean" / "manifest.json").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(len(layer["experts"]) for layer in manifest["moe_layers"]) == 3 * 64


def test_keep_the_checkpoints_precision(tmp_path):
    """--quant keep: a bf16 checkpoint's weights are stored as fp16 (no bf16 kernels yet), the
    dense part too; the logits stay within fp16 storage error of transformers'."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "olmoe-1b-7b", *TINY, "--set", "num_experts=4")
    proc = compile_cli(ckpt, tmp_path / "art", "--quant", "keep", "--quiet")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["compile_info"]["quant"]["dense"].startswith("fp16")
    assert {e["workload"].split("_")[-1][:4] for layer in manifest["moe_layers"] for e in layer["experts"]} == {"fp16"}
    import transformers

    from moetvm.runtime import load_model

    tokens = np.array([[1, 7, 42, 255, 3, 99]], dtype=np.int64)
    ours = load_model(tmp_path / "art")(tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens)).logits.numpy()
    # bf16 values are exact in fp16 (but for subnormals); the error is the fp16 KV cache's
    assert np.abs(ours - want).max() / np.abs(want).max() < 1e-2
