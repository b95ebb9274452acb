"""The emulated Cortex-A72 board: qemu-aarch64 -cpu cortex-a72 + an aarch64 sysroot built by
scripts/board/build-board-a72 (Python 3.11, numpy, the aarch64 TVM wheel, moetvm.runtime)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moetvm.artifact import read_manifest
from moetvm.verify import relative_error
from hf_models import greedy_ids
from servers import start, stop

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


BOARD_SCRIPT = """
import json, sys
import numpy as np
from moetvm.runtime import load_model
model = load_model(sys.argv[1], cache_budget=sys.argv[2])
tokens = np.array(json.loads(sys.argv[3]), dtype=np.int64)
np.save(sys.argv[4], model(tokens))
import platform
print(json.dumps({"new": model.generate(tokens[0], 32), "machine": platform.machine(), "stats": model.stats()}))
"""


def test_a72_artifact_runs_on_emulated_board(board, a72_artifact, reference_model, heldout_tokens, tmp_path):
    tokens = heldout_tokens[5000:5024][None]
    out = tmp_path / "logits.npy"
    proc = subprocess.run([board, "-c", BOARD_SCRIPT, a72_artifact, "25%", json.dumps(tokens.tolist()), out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"] == "aarch64"
    with torch.no_grad():
        theirs = reference_model(torch.from_numpy(tokens)).numpy()
    assert relative_error(np.load(out), theirs) < 1e-4
    assert result["new"] == greedy_ids(reference_model, tokens, 32)
    assert result["stats"]["evictions"] > 0  # 25% budget: the board's cache really worked


@pytest.fixture
def tracker(tmp_path):
    proc, line = start([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", "9190",
                         "--port-end", "9290"], "bind to", tmp_path / "tracker.log")
    port = int(re.search(r"bind to 127\.0\.0\.1:(\d+)", line).group(1))  # busy ports move silently
    yield f"127.0.0.1:{port}"
    stop(proc)


def _board_server(board, tmp_path, *args):
    proc, line = start([REPO / "scripts" / "board" / "board-a72", "--port", "9300", *args], "moetvm board serving",
                        tmp_path / "board.log", timeout=300)
    return proc, int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


def _deploy(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moetvm.cli", "deploy", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_deploy_through_tracker(board, tracker, a72_artifact, tmp_path):
    from moetvm.runtime import load_model

    server, _ = _board_server(board, tmp_path, "--tracker", tracker, "--key", "rasp4")
    try:
        proc = _deploy(a72_artifact, "--tracker", tracker, "--key", "rasp4", "--prompt", "import sys\n",
                       "--max-new-tokens", "24")
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["board"]["machine"] == "aarch64"
    assert set(report) >= {"text", "hit_rate", "latency_ms", "expert_loads", "peak_rss_mb", "deploy"}
    # The board's budget is the target's 1 GB: every expert fits, so only first uses miss.
    assert report["evictions"] == 0 and report["expert_loads"] <= 32
    # Same tokens as this machine's runtime on the host artifact of the same model.
    host = load_model(a72_artifact.parent / "reference-host") if (a72_artifact.parent / "reference-host").exists() else None
    if host is None:
        from moetvm.compiler import compile_model
        from moetvm.compiler.models import load_model_source

        host = load_model(compile_model(load_model_source("reference"), target="host",
                                        out=tmp_path / "host", progress=False))
    expected = bytes(host.generate(list(b"import sys\n"), 24)).decode("utf-8", errors="replace")
    assert report["text"] == expected


def test_board_dying_mid_deploy_is_a_clear_error(board, a72_artifact, tmp_path):
    server, port = _board_server(board, tmp_path)
    started = time.time()
    deploy = subprocess.Popen([sys.executable, "-m", "moetvm.cli", "deploy", str(a72_artifact), "--rpc",
                               f"127.0.0.1:{port}", "--max-new-tokens", "400"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "board.log"
    deadline = time.time() + 120
    while "start serving" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # upload done, generating
    stop(server)
    out, err = deploy.communicate(timeout=60)
    assert deploy.returncode != 0
    assert "failed during" in err and "board closed the connection" in err, err
    assert "Traceback" not in err
    assert time.time() - started < 120


def test_quantized_artifact_on_board_matches_host(board, reference_model, heldout_tokens, tmp_path):
    """int4 experts + int8 router, cross-compiled: the board computes what the host computes."""
    from moetvm.compiler import compile_model
    from moetvm.runtime import load_model

    from dataclasses import replace

    from moetvm.targets import get_target

    options = dict(quant="int4", router_quant="int8", progress=False)
    # The A72 has no integer dot products, so the host is built for a CPU without them too
    # (x86-64-v2: no AVX2, hence neither VNNI's nor AVX2's dots) and runs the same fp32-product kernels.
    host_target = get_target("host")
    host_target = replace(host_target, tvm_target={**host_target.tvm_target, "mcpu": "x86-64-v2"})
    assert not host_target.int8_dot and not host_target.int4_dot
    host = compile_model(reference_model, target=host_target, out=tmp_path / "host", **options)
    a72 = compile_model(reference_model, target="cortex-a72", out=tmp_path / "a72", **options)
    tokens = heldout_tokens[7000:7020][None]
    out = tmp_path / "logits.npy"
    # A full budget: the board decodes through the resident layers (one call per MoE layer).
    proc = subprocess.run([board, "-c", BOARD_SCRIPT, a72, "100%", json.dumps(tokens.tolist()), out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host_logits = load_model(host)(tokens)
    assert relative_error(np.load(out), host_logits) < 1e-4
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stats"]["resident_layer_calls"] == 31 * 4  # 31 decode steps, 4 MoE layers
    assert result["new"] == load_model(host).generate(tokens[0], 32)


def test_int8_kv_cache_on_board_matches_host(board, reference_model, heldout_tokens, tmp_path):
    """The int8 KV cache's kernels (quantize on append, scales in the buffer) built for NEON
    compute what the host's compute, through a prefill and 32 decode steps: within 1e-4, or
    where the host keeps the cache in dot order (AVX512-VNNI: the query and the softmax weights
    rounded to 8 bits, which the board's float kernels do not) within 1e-2 (measured 1.8e-3)."""
    from moetvm.artifact import read_manifest
    from moetvm.compiler import compile_model
    from moetvm.runtime import load_model

    host = compile_model(reference_model, target="host", out=tmp_path / "host", kv_dtype="int8", progress=False)
    a72 = compile_model(reference_model, target="cortex-a72", out=tmp_path / "a72", kv_dtype="int8", progress=False)
    tokens = heldout_tokens[6000:6020][None]
    out = tmp_path / "logits.npy"
    proc = subprocess.run([board, "-c", BOARD_SCRIPT, a72, "100%", json.dumps(tokens.tolist()), out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dot = read_manifest(host).model.kv_cache.dot
    assert not read_manifest(a72).model.kv_cache.dot
    assert relative_error(np.load(out), load_model(host)(tokens)) < (1e-2 if dot else 1e-4)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["new"] == load_model(host).generate(tokens[0], 32)


def test_tune_on_board_through_tracker_then_cross_compile(board, tracker, reference_model, heldout_tokens, tmp_path):
    """MetaSchedule measures candidates on the emulated board via the tracker (emulated timings
    are not real Cortex-A72 timings), and a cross-compile applies the records."""
    from moetvm.artifact import read_manifest
    from moetvm.compiler import compile_model, tune_model

    server, _ = _board_server(board, tmp_path, "--tracker", tracker, "--key", "rasp4")
    try:
        report = tune_model(reference_model, target="cortex-a72", db=tmp_path / "db", trials=2, tracker=tracker,
                            key="rasp4", parts=("experts",), progress=False)
    finally:
        stop(server)
    assert report.trials_run > 0 and any(t.best_us is not None for t in report.tasks)
    out = compile_model(reference_model, target="cortex-a72", out=tmp_path / "a72", tuning_db=tmp_path / "db",
                        progress=False)
    assert read_manifest(out).compile_info["tuning"]["tuned"] >= 1
    tokens = heldout_tokens[1200:1216][None]
    proc = subprocess.run([board, "-c", BOARD_SCRIPT, out, "100%", json.dumps(tokens.tolist()), tmp_path / "l.npy"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        theirs = reference_model(torch.from_numpy(tokens)).numpy()
    assert relative_error(np.load(tmp_path / "l.npy"), theirs) < 1e-4


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoehybrid", "qwen3_next", "olmoe"])
def test_transformers_family_on_emulated_board(board, family, tmp_path):
    """GPT-OSS, the family with the most new kinds (clamped SwiGLU experts with biases as their
    own kernels, a biased router, attention sinks, sliding and full layers) and Granite-4.0-H (a
    Mamba2 mixer: a convolution state, LFM2's kind too, and a scan state, each its own in-place
    kernel, carried by the runtime between steps) and Qwen3-Next (a gated delta net's memory),
    and OLMoE (64-wide q, k and v: stacked into one weight, one GEMV writing the three),
    cross-compiled for the A72 and run on the emulated board with an evicting cache: logits and
    32 greedy tokens as transformers gives them here."""
    from hf_models import tiny_model

    from moetvm.compiler import compile_model

    model = tiny_model(family)
    out = compile_model(model, target="cortex-a72", out=tmp_path / "a72", progress=False)
    if family == "olmoe":
        assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" in \
            {t.name for w in read_manifest(out).weights for t in w.tensors}
    tokens = np.random.default_rng(0).integers(0, 128, size=(1, 12))
    proc = subprocess.run([board, "-c", BOARD_SCRIPT, out, "30%", json.dumps(tokens.tolist()), tmp_path / "l.npy"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"] == "aarch64" and result["stats"]["evictions"] > 0
    with torch.no_grad():
        assert relative_error(np.load(tmp_path / "l.npy"), model(torch.from_numpy(tokens)).logits.numpy()) < 1e-4
    assert result["new"] == greedy_ids(model, tokens, 32)


def test_encrypted_artifact_on_emulated_board(board, reference_model, heldout_tokens, tmp_path):
    """Weights encrypted for the A72 (ChaCha20-Poly1305: a Pi 4 has no AES instructions), the key
    given to the board's runtime through MOETVM_DECRYPT_KEY, decrypted in memory there: logits as
    PyTorch's; without the key, a one-line refusal."""
    import os

    from moetvm.artifact import read_manifest
    from moetvm.compiler import compile_model

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    out = compile_model(reference_model, target="cortex-a72", out=tmp_path / "a72", encrypt_key=key, progress=False)
    assert read_manifest(out).encryption.aead == "ChaCha20-Poly1305"
    tokens = heldout_tokens[2000:2016][None]
    args = [board, "-c", BOARD_SCRIPT, out, "25%", json.dumps(tokens.tolist()), tmp_path / "l.npy"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "MOETVM_DECRYPT_KEY": str(key)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stats"]["evictions"] > 0  # decrypted on every load
    with torch.no_grad():
        assert relative_error(np.load(tmp_path / "l.npy"), reference_model(torch.from_numpy(tokens)).numpy()) < 1e-4
    env = {k: v for k, v in os.environ.items() if k != "MOETVM_DECRYPT_KEY"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "the weights are encrypted; give the key file" in proc.stderr
