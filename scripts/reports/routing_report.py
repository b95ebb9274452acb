#!/usr/bin/env python3
"""What fixed-pattern routing and expert masking cost and buy, on the shipped model.

For each routing mode (learned, hash, tiling, cycle) and masking threshold, through real
artifacts on the second half of the held-out text (fitting and usage profiles use the first
half): held-out cross-entropy, top-1 agreement with the learned fp32 model, artifact bytes,
router time per token, and the expert-cache hit rate at a 25% budget with the runtime's
prefetching policy (decode, one token per step) next to plain LRU.

    .venv/bin/python scripts/reports/routing_report.py [-o build/routing-report] [--decode-tokens 256]
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
from moetvm.runtime import load_model
from moetvm.runtime.simulator import simulate

VARIANTS = [
    ("learned", {"routing": "learned"}),
    ("learned, mask<4%", {"routing": "learned", "mask_below": 0.04}),
    ("learned, mask<8%", {"routing": "learned", "mask_below": 0.08}),
    ("hash (fitted)", {"routing": "hash"}),
    ("tiling (16)", {"routing": "tiling", "tile": 16}),
    ("cycle (dwell 8)", {"routing": "cycle", "cycle_dwell": 8}),
]



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parents[2] / "build" / "routing-report")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model_source("reference")
    eval_text = heldout_split()[1]
    tokens = text_windows(eval_text, count=args.windows)
    stream = np.frombuffer(eval_text, dtype=np.uint8).astype(np.int64)[: args.decode_tokens]
    with torch.no_grad():
        reference = model(torch.from_numpy(tokens)).numpy()

    rows = []
    for label, options in VARIANTS:
        path = compile_model(model, target="host", out=args.out / label.split(" ")[0] / label.replace(" ", "_").replace("%", "pct")
                             .replace("<", "lt").replace(",", "").replace("(", "").replace(")", ""),
                             calibration=calibration_windows(), progress=False, source="reference", **options)
        manifest = read_manifest(path)
        runtime = load_model(path)
        logits = runtime(tokens)
        # Decode the stream one token per step with a 25% cache and prefetch, recording the trace.
        decoder = load_model(path, cache_budget="25%", prefetch=True)
        decoder.start_trace()
        cache = decoder.new_cache()
        for t in stream:
            _, cache = decoder.step(np.array([[t]], dtype=np.int64), cache)
            decoder.cache.drain()
        trace = decoder.stop_trace()
        # Router time from a plain decode (no prefetch thread competing for the interpreter).
        timer = load_model(path, cache_budget="100%")
        cache64 = timer.new_cache()
        for t in stream[:128]:
            _, cache64 = timer.step(np.array([[t]], dtype=np.int64), cache64)
        lru = simulate(trace, decoder.cache.budget, policies=("lru",))["lru"]
        s = decoder.cache.stats
        rows.append({
            "variant": label,
            "cross_entropy_bits": cross_entropy_bits(logits, tokens),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "artifact_bytes": sum(f.size for f in manifest.files()),
            "experts": sum(len(layer.experts) for layer in manifest.moe_layers),
            "router_us_per_token": timer.timings.routing / 128 * 1e6,
            "hit_rate_runtime": s.hits / (s.hits + s.misses),
            "hit_rate_lru": lru["hit_rate"],
        })
        print(f"evaluated {label}", file=sys.stderr)

    header = (f"{'variant':18s} {'CE bits/B':>9s} {'top-1 agr':>9s} {'artifact MB':>11s} {'experts':>7s} "
              f"{'router us/tok':>13s} {'hit@25% runtime':>15s} {'hit@25% LRU':>11s}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['variant']:18s} {r['cross_entropy_bits']:9.4f} {r['top1_agreement']:9.2%} "
              f"{r['artifact_bytes'] / 1e6:11.2f} {r['experts']:7d} {r['router_us_per_token']:13.1f} "
              f"{r['hit_rate_runtime']:15.1%} {r['hit_rate_lru']:11.1%}")
    (args.out / "report.json").write_text(json.dumps(rows, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["variant"] for r in rows]
    y = np.arange(len(rows))
    a1.barh(y, [r["top1_agreement"] * 100 for r in rows], color="tab:blue")
    a1.set(yticks=y, yticklabels=names, xlabel="top-1 agreement with learned fp32 (%)", title="Accuracy cost")
    a1.invert_yaxis()
    a2.barh(y - 0.2, [r["hit_rate_runtime"] * 100 for r in rows], height=0.4, label="runtime (prefetch)")
    a2.barh(y + 0.2, [r["hit_rate_lru"] * 100 for r in rows], height=0.4, label="plain LRU")
    a2.set(yticks=y, yticklabels=[""] * len(rows), xlabel="expert-cache hit rate at 25% budget (%)", title="Cache gain")
    a2.invert_yaxis()
    a2.legend(loc="lower right")
    fig.tight_layout()
    png = args.out / "routing_modes.png"
    fig.savefig(png, dpi=120)
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
