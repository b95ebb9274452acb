#!/usr/bin/env python3
"""Accuracy vs bytes of expert quantization on the shipped model, through real artifacts.

For fp32 / fp16 / int8 / int4 (asymmetric and symmetric) / auto (and fp32 experts with an int8
router): artifact bytes, bytes per expert, held-out cross-entropy (bits/byte), top-1 next-token
agreement with the fp32 PyTorch model, and the router's top-k *set* agreement with the fp32 router. Auto is calibrated
on the first half of the held-out text; everything is evaluated on the second half.

    .venv/bin/python scripts/reports/quant_report.py [-o build/quant-report] [--windows 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from moetvm.artifact import read_manifest
from moetvm.compiler import compile_model
from moetvm.compiler.models import (calibration_windows, cross_entropy_bits, heldout_split, load_model_source,
                                    text_windows)
from moetvm.compiler.quant_plan import calibrate
from moetvm.compiler import find_moe_layers
from moetvm.routing import select_experts
from moetvm.runtime import load_model

VARIANTS = [  # (label, compile options)
    ("fp32", {"quant": "fp32"}),
    ("fp16", {"quant": "fp16"}),
    ("int8", {"quant": "int8"}),
    ("int4 (g32)", {"quant": "int4", "group_size": 32}),
    ("int4 sym (g32)", {"quant": "int4", "group_size": 32, "int4_symmetric": True}),
    ("auto 30%", {"quant": "auto", "weight_budget": "30%"}),
    ("fp32 + int8 router", {"quant": "fp32", "router_quant": "int8"}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parents[2] / "build" / "quant-report")
    ap.add_argument("--windows", type=int, default=48, help="128-byte evaluation windows")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model_source("reference")
    tokens = text_windows(heldout_split()[1], count=args.windows)
    with torch.no_grad():
        fp32_logits = model(torch.from_numpy(tokens)).numpy()
    specs = find_moe_layers(model)
    moe_inputs = calibrate(model, specs, tokens)  # fp32 MoE inputs and fp32 top-k per layer

    rows = []
    for label, options in VARIANTS:
        extra = {"calibration": calibration_windows()} if options["quant"] == "auto" else {}
        path = compile_model(model, target="host", out=args.out / label.replace(" ", "_").replace("%", "pct"),
                             progress=False, source="reference", **options, **extra)
        manifest = read_manifest(path)
        runtime = load_model(path)
        logits = runtime(tokens)
        same = total = 0
        for layer, cal in enumerate(moe_inputs):
            router = manifest.moe_layers[layer].router
            scores = runtime.router_scores(layer, cal.inputs)
            idx, _ = select_experts(scores, router)
            same += sum(set(a) == set(b) for a, b in zip(idx.tolist(), cal.indices.tolist()))
            total += len(idx)
        experts = [e for layer in manifest.moe_layers for e in layer.experts]
        rows.append({
            "variant": label,
            "artifact_bytes": sum(f.size for f in manifest.files()),
            "expert_bytes": sum(e.weight_bytes for e in experts),
            "bytes_per_expert": sum(e.weight_bytes for e in experts) / len(experts),
            "cross_entropy_bits": cross_entropy_bits(logits, tokens),
            "top1_agreement": float((logits.argmax(-1) == fp32_logits.argmax(-1)).mean()),
            "router_topk_agreement": same / total,
            "plan": manifest.compile_info["quant"].get("counts"),
        })
        print(f"compiled and evaluated {label}", file=sys.stderr)

    ref_ce = cross_entropy_bits(fp32_logits, tokens)
    print(f"\nheld-out evaluation: {tokens.size} tokens ({args.windows} windows x 128); PyTorch fp32 "
          f"cross-entropy {ref_ce:.4f} bits/byte\n")
    header = f"{'variant':20s} {'artifact MB':>11s} {'experts MB':>10s} {'KB/expert':>9s} {'CE bits/B':>9s} {'top-1 agr':>9s} {'router top-k':>12s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:20s} {r['artifact_bytes'] / 1e6:11.2f} {r['expert_bytes'] / 1e6:10.2f} "
              f"{r['bytes_per_expert'] / 1e3:9.1f} {r['cross_entropy_bits']:9.4f} {r['top1_agreement']:9.2%} "
              f"{r['router_topk_agreement']:12.2%}" + (f"  plan {r['plan']}" if r["plan"] else ""))
    (args.out / "report.json").write_text(json.dumps(rows, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        x = r["expert_bytes"] / 1e6
        a1.scatter(x, r["top1_agreement"] * 100)
        a1.annotate(r["variant"], (x, r["top1_agreement"] * 100), textcoords="offset points", xytext=(4, 4), fontsize=8)
        a2.scatter(x, r["cross_entropy_bits"])
        a2.annotate(r["variant"], (x, r["cross_entropy_bits"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a1.set(xlabel="expert weights (MB)", ylabel="top-1 agreement with fp32 (%)", title="Agreement vs bytes")
    a2.axhline(ref_ce, color="gray", lw=0.8, ls="--", label="PyTorch fp32")
    a2.set(xlabel="expert weights (MB)", ylabel="held-out cross-entropy (bits/byte)", title="Loss vs bytes")
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle("moetvm expert quantization on the reference MoE (4 layers x 8 experts)")
    fig.tight_layout()
    png = args.out / "quant_accuracy_vs_bytes.png"
    fig.savefig(png, dpi=120)
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
