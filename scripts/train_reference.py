#!/usr/bin/env python3
"""Train the shipped reference MoE LM on the Python standard library's own sources.

Deterministic (fixed seed, fixed file order, fixed step count) and CPU-only: a few minutes on one
core. Writes the fp16 checkpoint and the held-out text split into compiler/models/assets/, and
prints validation bits/byte and routing statistics (skew, locality, next-layer predictability).

    .venv/bin/python scripts/train_reference.py [--steps 600] [--out compiler/models/assets]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moetvm.compiler.models.reference import ReferenceConfig, ReferenceMoELM, save_checkpoint

HELDOUT_BYTES = 48_000


def stdlib_corpus() -> tuple[bytes, bytes]:
    """(train bytes, held-out bytes): every 10th stdlib module file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % 10 == 5 else train).append(path.read_bytes())
    return b"\n".join(train), b"\n".join(held)[:HELDOUT_BYTES]


def routing_stats(model: ReferenceMoELM, tokens: torch.Tensor) -> dict:
    """Per layer: share of routing taken by the busiest 20% of experts, how often consecutive
    tokens share an expert, and how often layer l's router applied to layer l-1's MoE input
    predicts one of layer l's experts (what prefetching will rely on)."""
    inputs = {}
    hooks = [
        blk.moe.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, blk in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    layers = []
    for i, blk in enumerate(model.blocks):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])
        _, _, idx = blk.moe.route(x)
        counts = np.bincount(idx.flatten().numpy(), minlength=model.cfg.n_experts)
        hot = max(1, round(0.2 * model.cfg.n_experts))
        shares = np.sort(counts)[::-1] / counts.sum()
        sets = [set(r) for r in idx.tolist()]
        locality = np.mean([bool(a & b) for a, b in zip(sets, sets[1:])])
        entry = {
            "layer": i,
            "top20_share": float(shares[:hot].sum()),
            "max_share": float(shares[0]),
            "consecutive_overlap": float(locality),
        }
        if i > 0:
            prev = inputs[i - 1].reshape(-1, x.shape[-1])
            _, _, guess = blk.moe.route(prev)
            hit = [len(set(g) & s) / len(s) for g, s in zip(guess.tolist(), sets)]
            entry["lookahead_recall"] = float(np.mean(hit))
        layers.append(entry)
    return {"layers": layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "compiler/models/assets")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    train_bytes, held_bytes = stdlib_corpus()
    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8).long()
    print(f"corpus: {len(train_bytes)/1e6:.1f} MB train, {len(held_bytes)/1e3:.0f} KB held out "
          f"(Python {sys.version.split()[0]} stdlib)")

    cfg = ReferenceConfig()
    model = ReferenceMoELM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f}M parameters")
    router_logits = []
    for blk in model.blocks:
        blk.moe.router.register_forward_hook(lambda m, a, out: router_logits.append(out))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s : s + args.seq + 1] for s in starts.tolist()])
        router_logits.clear()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        aux = 0.0
        for rl in router_logits:  # Switch-style balance: E * sum_e(fraction_e * mean_prob_e)
            probs = rl.reshape(-1, cfg.n_experts).softmax(-1)
            frac = F.one_hot(probs.topk(cfg.top_k, -1).indices, cfg.n_experts).float().sum(1).mean(0)
            aux = aux + cfg.n_experts * (frac / cfg.top_k * probs.mean(0)).sum()
        opt.zero_grad()
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item()/np.log(2):.3f} bits/byte  "
                  f"{time.time()-t0:5.0f}s", flush=True)

    model.eval()
    with torch.no_grad():
        n = (len(held) - 1) // args.seq * args.seq  # windows as long as the training context
        x = held[:n].reshape(-1, args.seq)
        y = held[1 : n + 1].reshape(-1, args.seq)
        val = F.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1)).item()
    stats = routing_stats(model, x[:8])
    report = {
        "val_bits_per_byte": val / np.log(2),
        "train_seconds": round(time.time() - t0, 1),
        "steps": args.steps,
        "context": args.seq,
        "python": sys.version.split()[0],
        "routing": stats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out / "reference.safetensors", extra=report)
    (args.out / "heldout.txt").write_bytes(held_bytes)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
