"""The `moetvm` command line, run as users run it: a real process."""

import json
import shutil
import subprocess
import sys

import click
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moetvm.artifact import read_manifest, sha256_file


def moetvm(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "moetvm.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"moetvm {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def test_run_json_report(reference_artifact):
    report = json.loads(moetvm("run", reference_artifact, "--prompt", "class ", "--max-new-tokens", "12",
                               "--cache-budget", "25%", "--json").stdout)
    assert isinstance(report["text"], str) and report["decode_tokens"] == 11
    assert 0 <= report["hit_rate"] <= 1
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    assert report["expert_loads"] >= 8 and report["peak_rss_mb"] > 0
    assert report["resident_expert_bytes"] <= report["cache_budget_bytes"] == report["total_expert_bytes"] // 4


def test_run_serves_without_torch_or_the_tvm_package(reference_artifact):
    """torch is installed here (the compiler needs it) and tvm_ffi would import it on its own
    (~300 MB of RSS a board never pays), and `import tvm` costs ~35 MB and its compiler library
    ~110 MB more: `run` does without all three (TVM's runtime library through tvm_ffi), and runs
    resident at a full budget."""
    code = ("import sys; from moetvm.cli import main; "
            f"main(['run', {str(reference_artifact)!r}, '--max-new-tokens', '3', '--cache-budget', '100%', '--json'], "
            "standalone_mode=False); "
            "print(sys.modules.get('torch') is not None, 'tvm' in sys.modules, 'tvm_ffi' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    *report, loaded = proc.stdout.strip().splitlines()
    assert loaded == "False False True"
    assert json.loads("\n".join(report))["resident_layer_calls"] == 2 * 4  # 2 decode steps, 4 MoE layers


def test_human_report_and_inspect(reference_artifact):
    text = moetvm("run", reference_artifact, "--max-new-tokens", "4").stdout
    assert "hit rate" in text and "p95" in text
    summary = moetvm("inspect", reference_artifact).stdout
    assert "32 experts share it" in summary and "segment_4" in summary


def test_verify_passes_on_good_artifact(reference_artifact):
    report = json.loads(moetvm("verify", reference_artifact, "--windows", "2", "--generate", "8", "--json").stdout)
    assert report["ok"] and report["max_relative_logit_error"] < 1e-4 and report["greedy_tokens_equal"] == 8


def test_verify_fails_on_wrong_weights(reference_artifact, tmp_path):
    """An expert replaced by other, consistently re-hashed weights loads fine but computes wrong
    numbers: verify must catch it and exit non-zero."""
    art = tmp_path / "art"
    shutil.copytree(reference_artifact, art)
    manifest_path = art / "manifest.json"
    data = json.loads(manifest_path.read_text())
    entry = data["moe_layers"][0]["experts"][0]["file"]
    path = art / entry["path"]
    weights = {k: (v * 1.5).astype(np.float32) for k, v in load_file(str(path)).items()}
    save_file(weights, str(path))
    entry.update(size=path.stat().st_size, sha256=sha256_file(path))
    manifest_path.write_text(json.dumps(data))
    read_manifest(art)
    proc = moetvm("verify", art, "--windows", "2", "--generate", "4", check=False)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout


def test_unknown_target_is_a_clear_cli_error(tmp_path):
    proc = moetvm("compile", "reference", "--target", "pi-zero", "-o", tmp_path / "x", check=False)
    assert proc.returncode != 0
    assert "unknown target 'pi-zero'; known targets: cortex-a72, host, jetson-orin" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_targets_listed():
    out = moetvm("targets").stdout
    for name in ("host", "cortex-a72", "jetson-orin"):
        assert name in out


@pytest.mark.slow
def test_compile_reference_from_cli(tmp_path):
    out = tmp_path / "ref"
    proc = moetvm("compile", "reference", "--target", "host", "-o", out)
    assert "[1/7] trace" in proc.stderr and "wrote" in proc.stderr
    assert read_manifest(out).model.source == "reference"
    assert json.loads(moetvm("verify", out, "--windows", "1", "--generate", "4", "--json").stdout)["ok"]


def test_compile_flags_are_the_compile_options():
    """`compile` and `tune` build a CompileOptions: every flag's default is the dataclass's and
    every choice list is its registry's, so the CLI cannot drift from the Python API."""
    import dataclasses

    from moetvm.artifact import KV_DTYPES, QUANT_SCHEMES, ROUTING_MODES
    from moetvm.cli import compile_cmd, tune
    from moetvm.compiler.options import QUANT_CHOICES, CompileOptions
    
    flags = {p.name: p for p in compile_cmd.params}
    defaults, context = CompileOptions(), click.Context(compile_cmd)
    for field in dataclasses.fields(CompileOptions):
        assert flags[field.name].get_default(context) == getattr(defaults, field.name), field.name
    assert tuple(flags["quant"].type.choices) == QUANT_CHOICES
    assert tuple(flags["dense_quant"].type.choices) == QUANT_SCHEMES
    assert tuple(flags["kv_dtype"].type.choices) == KV_DTYPES
    assert tuple(flags["routing"].type.choices) == ROUTING_MODES
    tune_flags = {p.name: p for p in tune.params}
    assert tuple(tune_flags["quant"].type.choices) == QUANT_SCHEMES
    assert tune_flags["group_size"].get_default(click.Context(tune)) == defaults.group_size
