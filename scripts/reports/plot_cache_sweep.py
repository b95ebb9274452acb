#!/usr/bin/env python3
"""Sweep expert-cache budgets over a routing trace: a table and a plot of hit rate per policy.

    .venv/bin/python scripts/reports/plot_cache_sweep.py TRACE.npz -o sweep.png
        [--budgets 12.5%,25%,50%,100%] [--policies lru,lfu,pinned,runtime,belady]
        [--profile CALIBRATION.npz] [--pin-fraction F]

The table has one row per (budget, policy): hit rate, demand misses and MB loaded (every load:
demand, prefetch and the pinned hot set). The plot has hit rate against budget (% of all routed
experts' bytes), one line per policy. See runtime/simulator.py for what each policy does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moetvm.runtime.simulator import POLICIES, sweep
from moetvm.runtime.trace import RoutingTrace

DEFAULT_BUDGETS = "12.5%,25%,37.5%,50%,62.5%,75%,87.5%,100%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path, help="routing trace (.npz) written by the runtime's TraceRecorder")
    ap.add_argument("-o", "--out", type=Path, help="PNG to write (default: TRACE with a .png suffix)")
    ap.add_argument("--budgets", default=DEFAULT_BUDGETS,
                    help=f"comma-separated: bytes, sizes (64MB) or percentages (default {DEFAULT_BUDGETS})")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, from " + ", ".join(POLICIES))
    ap.add_argument("--profile", type=Path, help="calibration trace choosing the pinned hot set "
                                                 "(default: the trace's own counts, an optimistic oracle)")
    ap.add_argument("--pin-fraction", type=float, default=None,
                    help="share of the budget the pinned hot set may take (default: the runtime's rule, "
                         "room for a token's experts left, at most half)")
    args = ap.parse_args(argv)

    try:
        trace = RoutingTrace.load(args.trace)
        profile = RoutingTrace.load(args.profile) if args.profile else None
        rows = sweep(trace, [b.strip() for b in args.budgets.split(",") if b.strip()],
                     [p.strip() for p in args.policies.split(",") if p.strip()], profile, args.pin_fraction)
    except (OSError, ValueError) as e:  # TraceError is a ValueError; so are bad budgets/policies
        print(f"error: {e}", file=sys.stderr)
        return 1

    total = trace.total_bytes
    predicted = any(r.predicted is not None for step in trace.steps for r in step.values())
    print(f"{args.trace}: {len(trace.steps)} steps, {sum(len(s) for s in trace.steps)} layer calls, "
          f"{rows[0]['accesses'] if rows else 0} expert accesses, {total / 1e6:.2f} MB of routed experts, "
          f"predictions: {'yes' if predicted else 'no'}")
    print(f"{'budget':>8} {'MB':>8}  {'policy':<8} {'hit rate':>8} {'misses':>7} {'MB loaded':>10}  notes")
    for row in rows:
        notes = ""
        if row["policy"] in ("pinned", "runtime"):
            notes = f"{row['pinned']} pinned"
        if row["policy"] == "runtime" and predicted:
            notes += (f", prefetch {row['prefetch_loads']} (precision {row['prefetch_precision']:.2f}, "
                      f"recall {row['prefetch_recall']:.2f})")
        if row["policy"] == "belady" and not row["exact"]:
            notes = "mixed sizes: a heuristic bound"
        print(f"{str(row['budget']):>8} {row['budget_bytes'] / 1e6:8.2f}  {row['policy']:<8} "
              f"{row['hit_rate']:8.3f} {row['misses']:7d} {row['bytes_loaded'] / 1e6:10.2f}  {notes}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.out or args.trace.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(row["policy"] for row in rows):
        points = [(100 * r["budget_bytes"] / total, r["hit_rate"]) for r in rows if r["policy"] == policy]
        ax.plot(*zip(*points), marker="o", label=policy)
    ax.set_xlabel("cache budget (% of all routed experts' bytes)")
    ax.set_ylabel("hit rate (demand accesses)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{args.trace.name}: {len(trace.steps)} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
