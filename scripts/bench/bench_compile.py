#!/usr/bin/env python3
"""Compile real-shaped checkpoints by streaming them, and measure what it costs.

    .venv/bin/python scripts/bench/bench_compile.py            # ~20 min, ~30 GB of disk at its peak

Makes (once) random-weight bf16 checkpoints with scripts/make_checkpoint.py under
build/bench-compile/checkpoints, then compiles each case with `moetvm compile hf:DIR` in its own
process and records its peak RSS (the process's own high-water mark, VmHWM), wall time
and artifact size:

  * OLMoE-1B-7B shape (16 layers x 64 experts, 6.9B parameters, 13.8 GB bf16) -> int4 for each
    --targets (host, cortex-a72); goal: peak <= 4 GB and <= 20 min; then one compile for all the
    targets (`--target host --target cortex-a72`: the checkpoint read and quantized once);
  * the same shape cut to 2 layers with 64 and with 128 experts -> int4 host: the peak may grow
    by < 10% when the experts double;
  * Mixtral-8x7B with 2 of its 32 layers -> int4 host: the same bound;
  * the 2-layer OLMoE shape -> fp32 and int4 host, run and compared with transformers in fp32
    (the bf16 weights upcast exactly): fp32 shows the streamed compile computes what the
    checkpoint holds, int4 the size of 4-bit error on these weights.

Each artifact is deleted once measured (--keep keeps them). Writes build/bench-compile/results.json
and compile.png (peak RSS beside each model's fp32 size); --full-size-only (the OLMoE-1B-7B
compiles alone) writes full-size.json and full-size.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE = ROOT / "scripts" / "make_checkpoint.py"

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child
# reports its parent's RSS at the fork when that is larger than its own peak.
PEAK = """
import sys, time
from moetvm.cli import main
started = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"PEAK {hwm * 1024} {time.perf_counter() - started:.1f}", file=sys.stderr)
"""

COMPARE = """
import json, sys
import numpy as np, torch, transformers
from moetvm.runtime import load_model
tokens = np.array([[1, 17, 300, 4000, 123, 9, 50000, 7]], dtype=np.int64)
ours = load_model(sys.argv[2])(tokens)
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    want = model(torch.from_numpy(tokens)).logits.numpy()
print(json.dumps({"max_relative_logit_error": float(np.abs(ours - want).max() / np.abs(want).max())}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def checkpoint(root: Path, name: str, shape: str, *args: str) -> Path:
    path = root / "checkpoints" / name
    if (path / "config.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)  # a half-made one of ours
    log(f"making checkpoint {name}")
    subprocess.run([sys.executable, str(MAKE), str(path), "--shape", shape, *args], check=True)
    return path


def compile_case(model: Path, out: Path, target: str, quant: str) -> dict:
    """`target`: one name, or several joined by "+" (one compile for them all, an artifact each)."""
    shutil.rmtree(out, ignore_errors=True)
    log(f"compile {model.name} -> {quant} for {target}")
    targets = [arg for t in target.split("+") for arg in ("--target", t)]
    proc = subprocess.run([sys.executable, "-c", PEAK, "compile", f"hf:{model}", *targets, "--quant", quant,
                           "-o", str(out)], stderr=subprocess.PIPE, text=True)
    peak, seconds = next(line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("PEAK"))
    if proc.returncode != 0:
        raise SystemExit(f"compile failed:\n{proc.stderr[-3000:]}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    bf16 = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    result = {"model": model.name, "target": target, "quant": quant, "peak_rss_bytes": int(peak),
              "seconds": float(seconds), "artifact_bytes": size, "checkpoint_bf16_bytes": bf16, "fp32_bytes": 2 * bf16}
    log(f"  peak {int(peak) / 1e9:.2f} GB, {float(seconds):.0f} s, artifact {size / 1e9:.2f} GB "
        f"(checkpoint {bf16 / 1e9:.2f} GB bf16)")
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].replace('-2layers', chr(10) + '2 layers').replace('-128experts', ', 128 experts')}\n"
              f"{r['quant']} {r['target']}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r["fp32_bytes"] / 1e9 for r in results], 0.4, label="model in fp32", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [r["peak_rss_bytes"] / 1e9 for r in results], 0.4, label="compile peak RSS",
           color="#1f77b4")
    ax.axhline(4, color="#d62728", ls="--", lw=1, label="goal: 4 GB")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GB")
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
    ax.set_title("Streamed compiles: peak memory against model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "build" / "bench-compile")
    parser.add_argument("--targets", nargs="+", default=["host", "cortex-a72"])
    parser.add_argument("--keep", action="store_true", help="keep the artifacts")
    parser.add_argument("--full-size-only", action="store_true", help="only the OLMoE-1B-7B compiles")
    args = parser.parse_args()
    root, arts = args.root, args.root / "artifacts"
    results = []

    def case(model: Path, target: str, quant: str, name: str, drop: bool = True) -> dict:
        result = compile_case(model, arts / name, target, quant)
        results.append(result)
        if drop and not args.keep:
            shutil.rmtree(arts / name)
        return result

    two_layers = ["--layers", "2"]
    olmoe2 = checkpoint(root, "olmoe-1b-7b-2layers", "olmoe-1b-7b", *two_layers)
    def compare(model: Path, name: str) -> None:
        compared = subprocess.run([sys.executable, "-c", COMPARE, str(model), str(arts / name)],
                                  capture_output=True, text=True, check=True)
        results[-1].update(json.loads(compared.stdout.splitlines()[-1]))
        log(f"  vs transformers fp32: max relative logit error {results[-1]['max_relative_logit_error']:.2e}")
        shutil.rmtree(arts / name) if not args.keep else None

    if not args.full_size_only:
        case(olmoe2, "host", "fp32", "olmoe2-fp32", drop=False)
        compare(olmoe2, "olmoe2-fp32")
        base = case(olmoe2, "host", "int4", "olmoe2-int4", drop=False)
        compare(olmoe2, "olmoe2-int4")  # the int4 error itself, for scale
        olmoe2x = checkpoint(root, "olmoe-1b-7b-2layers-128experts", "olmoe-1b-7b", *two_layers, "--set", "num_experts=128")
        doubled = case(olmoe2x, "host", "int4", "olmoe2x-int4")
        doubled["peak_growth_for_2x_experts"] = doubled["peak_rss_bytes"] / base["peak_rss_bytes"] - 1
        log(f"  twice the experts: peak {100 * doubled['peak_growth_for_2x_experts']:+.1f}%")

        mixtral = checkpoint(root, "mixtral-8x7b-2layers", "mixtral-8x7b", *two_layers)
        case(mixtral, "host", "int4", "mixtral2-int4")

    olmoe = checkpoint(root, "olmoe-1b-7b", "olmoe-1b-7b")
    for target in args.targets:
        case(olmoe, target, "int4", f"olmoe-int4-{target}")
    if len(args.targets) > 1:  # all of them in one compile: the checkpoint read and quantized once
        joint = case(olmoe, "+".join(args.targets), "int4", "olmoe-int4-targets")
        alone = sum(r["seconds"] for r in results if r["model"] == olmoe.name and r["target"] in args.targets)
        joint["seconds_one_target_at_a_time"] = alone
        log(f"  one compile for {len(args.targets)} targets: {joint['seconds'] / 60:.1f} min against "
            f"{alone / 60:.1f} min one at a time")

    data, figure = (root / "full-size.json", root / "full-size.png") if args.full_size_only else \
        (root / "results.json", root / "compile.png")
    data.write_text(json.dumps(results, indent=1))
    plot(results, figure)
    print(f"{'model':34s} {'target':11s} {'quant':5s} {'fp32 GB':>8s} {'peak GB':>8s} {'min':>6s} {'artifact GB':>12s}")
    for r in results:
        print(f"{r['model']:34s} {r['target']:11s} {r['quant']:5s} {r['fp32_bytes'] / 1e9:8.2f} "
              f"{r['peak_rss_bytes'] / 1e9:8.2f} {r['seconds'] / 60:6.1f} {r['artifact_bytes'] / 1e9:12.2f}")
    print(f"wrote {data} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
