#!/usr/bin/env python3
"""Confidence-based expert skipping (`--min-expert-weight W`) on the shipped model: what each W
saves and what it costs.

For each W, on the second half of the held-out text: expert slots run per token (of the top-k),
held-out cross-entropy (bits/byte) and top-1 next-token agreement with W = 0 (whole windows, the
runtime's prefill path); then decode at a 25% cache budget (the edge case: loads are the cost):
expert loads per token and tok/s, median of rounds, W values interleaved within each round.

    .venv/bin/python scripts/reports/skip_report.py [-o build/skip-report] [--windows 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from moetvm.compiler import compile_model
from moetvm.compiler.models import calibration_windows, cross_entropy_bits, heldout_split, load_model_source, text_windows
from moetvm.runtime import load_model

WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parents[2] / "build" / "skip-report")
    ap.add_argument("--windows", type=int, default=48, help="128-byte evaluation windows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = compile_model(load_model_source("reference"), target="host", out=args.out / "reference", progress=False,
                         source="reference", calibration=calibration_windows())
    tokens = text_windows(heldout_split()[1], count=args.windows)
    prompt = tokens[0, :16]

    rows, base_logits = {}, None
    for w in WEIGHTS:
        model = load_model(path, cache_budget="100%", min_expert_weight=w)
        logits = model(tokens)
        base_logits = logits if base_logits is None else base_logits
        slots = tokens.size * len(model.manifest.moe_layers) * model.manifest.moe_layers[0].router.top_k
        rows[w] = {"min_expert_weight": w, "experts_run_share": 1 - model.stats()["skipped_experts"] / slots,
                   "cross_entropy_bits": cross_entropy_bits(logits, tokens),
                   "top1_agreement": float((logits.argmax(-1) == base_logits.argmax(-1)).mean()),
                   "decode": []}
        print(f"[skip] W={w}: evaluated", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for w in WEIGHTS:
            model = load_model(path, cache_budget="25%", min_expert_weight=w)
            before = model.stats()["expert_loads"]
            started = time.perf_counter()
            model.generate(prompt, args.new_tokens, ignore_eos=True)
            seconds = time.perf_counter() - started
            rows[w]["decode"].append({"tok_s": args.new_tokens / seconds,
                                      "loads_per_token": (model.stats()["expert_loads"] - before) / args.new_tokens})
        print(f"[skip] decode round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for row in rows.values():
        row["tok_s"] = statistics.median(d["tok_s"] for d in row["decode"])
        row["loads_per_token"] = statistics.median(d["loads_per_token"] for d in row["decode"])

    k = load_model(path).manifest.moe_layers[0].router.top_k
    print(f"\nexpert skipping on the shipped model: {tokens.size} held-out tokens (top-{k} of each layer); "
          f"decode: {args.new_tokens} tokens at a 25% cache budget, median of {args.rounds} rounds\n")
    print(f"{'W':>5s} {'experts run':>11s} {'CE bits/B':>9s} {'top-1 agr':>9s} {'loads/token':>11s} {'tok/s':>7s}")
    for w, row in rows.items():
        print(f"{w:5.2f} {row['experts_run_share']:11.1%} {row['cross_entropy_bits']:9.4f} {row['top1_agreement']:9.2%} "
              f"{row['loads_per_token']:11.2f} {row['tok_s']:7.1f}")
    (args.out / "skip-report.json").write_text(json.dumps(list(rows.values()), indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ws = list(rows)
    a1.plot(ws, [rows[w]["experts_run_share"] * 100 for w in ws], marker="o", label="experts run (% of top-k)")
    a1.plot(ws, [rows[w]["top1_agreement"] * 100 for w in ws], marker="o", label="top-1 agreement with W=0 (%)")
    a1.set(xlabel="min expert weight W", ylabel="%", title="What skipping keeps")
    a1.legend()
    a2.plot(ws, [rows[w]["loads_per_token"] for w in ws], marker="o", color="C2")
    a2.set(xlabel="min expert weight W", ylabel="expert loads per decode token (25% budget)", title="What it saves")
    fig.tight_layout()
    fig.savefig(args.out / "skip-report.png", dpi=120)
    print(f"\nwrote {args.out / 'skip-report.json'} and {args.out / 'skip-report.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
