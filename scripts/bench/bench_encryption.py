#!/usr/bin/env python3
"""What encrypted weights cost at load (issue 20): the shipped model compiled plain and with
`--encrypt-key`, for the host and for the Cortex-A72, loaded with every expert (100% budget,
all preloaded) on this machine and on the emulated board (qemu-aarch64 + the board sysroot),
interleaved, medians; and each AEAD's decryption throughput on 64 MB in the same processes.

    .venv/bin/python scripts/bench/bench_encryption.py [--rounds 5] [--no-board]

Writes build/bench-encryption/results.json. Emulated timings are not a real board's: qemu
translates every instruction, and it gives the A72 model AES instructions a Pi 4 lacks, so the
board column says how the costs compare there, not what a Pi 4 measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "bench-encryption"
BOARD = ROOT / "scripts" / "board" / "board-a72-python"

# One load (or one decryption pass) per process run: what a user's `moetvm run` pays at start.
PROBE = r"""
import json, sys, time
what, path, key = sys.argv[1], sys.argv[2], sys.argv[3]
if what == "load":
    from moetvm.runtime import load_model
    t = time.perf_counter()
    m = load_model(path, cache_budget="100%", preload=1.0, decrypt_key=key if key != "-" else None)
    seconds = time.perf_counter() - t
    weights = sum(f.size for f in m.manifest.weight_files())
    print(json.dumps({"seconds": seconds, "weight_bytes": weights}))
else:
    import os
    from moetvm.encryption import WeightCipher
    cipher = WeightCipher(open(key, "rb").read(), what)
    data = cipher.encrypt("probe", os.urandom(int(path)))
    t = time.perf_counter()
    cipher.decrypt("probe", data)
    print(json.dumps({"seconds": time.perf_counter() - t, "weight_bytes": int(path)}))
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def probe(python: Path | str, *args) -> dict:
    proc = subprocess.run([str(python), "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench_encryption: {' '.join(map(str, args))}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-board", action="store_true", help="this machine only")
    ap.add_argument("--probe-mb", type=int, default=64)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    key = OUT / "key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
    machines = {"host": sys.executable} | ({} if args.no_board else {"cortex-a72": BOARD})
    if not args.no_board:
        subprocess.run([ROOT / "scripts" / "board" / "build-board-a72"], check=True)

    from moetvm.compiler import compile_model
    from moetvm.compiler.models import load_model_source
    from moetvm.targets import get_target

    model = load_model_source("reference")
    artifacts = {}
    for target in machines:
        for encrypted in (False, True):
            out = OUT / f"reference-{target}{'-encrypted' if encrypted else ''}"
            log(f"compile {out.name}")
            artifacts[target, encrypted] = compile_model(model, target=target, out=out, progress=False,
                                                         encrypt_key=key if encrypted else None)
    samples: dict[tuple, list] = {}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for target, python in machines.items():
            for encrypted in (False, True):
                got = probe(python, "load", artifacts[target, encrypted], key if encrypted else "-")
                samples.setdefault((target, "load", encrypted), []).append(got)
            for aead in ("AES-256-GCM", "ChaCha20-Poly1305"):
                got = probe(python, aead, args.probe_mb << 20, key)
                samples.setdefault((target, aead, True), []).append(got)

    results, lines = [], []
    for target in machines:
        plain = statistics.median(s["seconds"] for s in samples[target, "load", False])
        enc = statistics.median(s["seconds"] for s in samples[target, "load", True])
        mb = samples[target, "load", True][0]["weight_bytes"] / 1e6
        aead = get_target(target).weight_aead
        row = {"machine": target, "aead": aead, "weights_mb": mb, "load_plain_s": plain, "load_encrypted_s": enc,
               "extra_ms_per_mb": (enc - plain) * 1e3 / mb}
        for name in ("AES-256-GCM", "ChaCha20-Poly1305"):
            row[f"{name}_mb_per_s"] = args.probe_mb * 1.048576 / statistics.median(s["seconds"] for s in samples[target, name, True])
        results.append(row)
        lines.append(f"{target:11s} {aead:18s} {mb:8.1f} {plain:10.3f} {enc:10.3f} {row['extra_ms_per_mb']:11.2f} "
                     f"{row['AES-256-GCM_mb_per_s']:11.0f} {row['ChaCha20-Poly1305_mb_per_s']:11.0f}")
    print(f"encrypted weights: load of the shipped model (every expert), medians of {args.rounds} interleaved rounds")
    print(f"{'machine':11s} {'artifact AEAD':18s} {'weight MB':>8s} {'plain s':>10s} {'encrypted s':>10s} "
          f"{'+ms per MB':>11s} {'AES-GCM MB/s':>11s} {'ChaCha MB/s':>11s}")
    print("\n".join(lines))
    (OUT / "results.json").write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1))
    log(f"wrote {OUT / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
