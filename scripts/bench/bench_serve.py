#!/usr/bin/env python3
"""Throughput of `moetvm serve` against the same artifact decoding in-process, 1 and 8 clients.

    .venv/bin/python scripts/bench/bench_serve.py                 # ~10 min: compiles, then measures
    .venv/bin/python scripts/bench/bench_serve.py --artifact DIR  # an artifact you have

Per artifact, interleaved over --rounds rounds (medians reported): the runtime in this process
(`generate`, the floor the server adds its cost to), then `moetvm serve` (its own process, on
loopback) with 1 client making requests one after another, and with 8 clients at once (each
request waits in the server's FIFO queue: aggregate tokens/s, latency per request, time to first
token). Requests are greedy, `ignore_eos`, --max-tokens new tokens from a --prompt-tokens prompt.
Default artifacts (built once under build/bench-serve): the shipped reference model (3.5M
parameters, its byte tokenizer) and an OLMoE-1B-7B-shaped model cut to 2 layers (64 experts of
1024, hidden 2048; random bf16 weights from scripts/make_checkpoint.py) at int4, prompted with
token ids. Writes build/bench-serve/results.json and serve.png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "bench-serve"
CLI = [sys.executable, "-m", "moetvm.cli"]


def log(message: str) -> None:
    print(f"[bench-serve {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def default_artifacts() -> list[Path]:
    arts = []
    ref = OUT / "reference-host"
    if not (ref / "manifest.json").is_file():
        log("compile the reference model (host, fp32)")
        subprocess.run([*CLI, "compile", "reference", "-o", ref, "--quiet"], check=True)
    arts.append(ref)
    ckpt = ROOT / "build" / "bench-compile" / "checkpoints" / "olmoe-1b-7b-2layers"
    if not (ckpt / "config.json").is_file():
        ckpt = OUT / "olmoe-1b-7b-2layers"
        if not (ckpt / "config.json").is_file():
            log("make a 2-layer OLMoE-1B-7B-shaped checkpoint")
            subprocess.run([sys.executable, ROOT / "scripts" / "make_checkpoint.py", ckpt, "--shape", "olmoe-1b-7b",
                            "--layers", "2"], check=True)
    olmoe = OUT / "olmoe2-int4-host"
    if not (olmoe / "manifest.json").is_file():
        log("compile it (host, int4)")
        subprocess.run([*CLI, "compile", f"hf:{ckpt}", "-o", olmoe, "--quant", "int4", "--quiet"], check=True)
    arts.append(olmoe)
    return arts


def request(port: int, body: dict, stream: bool = False) -> dict:
    """One completion: its new tokens, seconds, and (streamed) seconds to the first token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = None
    if stream:
        chunks = 0
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["token_ids"]:
                first = first or time.perf_counter() - started
                chunks += 1
        tokens = body["max_tokens"]
    else:
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        tokens = answer["usage"]["completion_tokens"]
    conn.close()
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "first_token_s": first}


def measure(art: Path, rounds: int, max_tokens: int, prompt_tokens: int) -> dict:
    from moetvm.runtime import load_model

    model = load_model(art, cache_budget="100%")
    prompt = list(range(1, prompt_tokens + 1))  # token ids: every artifact takes them
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    log_file = OUT / f"{art.name}.serve.log"
    server = subprocess.Popen([*CLI, "serve", art, "--port", "0"], stderr=open(log_file, "w"), stdout=subprocess.DEVNULL)
    try:
        port = None
        while port is None:
            time.sleep(0.2)
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {log_file.read_text()[-1000:]}")
            line = next((l for l in log_file.read_text().splitlines() if "serving" in l), None)
            port = int(line.rsplit(":", 1)[1].split("/")[0]) if line else None
        request(port, {**body, "max_tokens": 2})  # warm: libraries loaded, experts resident
        model.generate(prompt, 2, ignore_eos=True)
        runs = {"in-process": [], "server, 1 client": [], "server, 8 clients": []}
        first_token = []
        for r in range(rounds):
            started = time.perf_counter()
            model.generate(prompt, max_tokens, ignore_eos=True)
            runs["in-process"].append(max_tokens / (time.perf_counter() - started))
            one = [request(port, body, stream=(i == 0)) for i in range(3)]
            first_token.append(one[0]["first_token_s"])
            runs["server, 1 client"].append(sum(x["tokens"] for x in one) / sum(x["seconds"] for x in one))
            results, threads = [None] * 8, []
            started = time.perf_counter()
            for i in range(8):
                threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, request(port, body))))
                threads[-1].start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            runs["server, 8 clients"].append(sum(x["tokens"] for x in results) / wall)
            latency = statistics.median(x["seconds"] for x in results)
            log(f"{art.name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in runs.items())
                + f"; 8 clients: median request {latency:.1f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"artifact": art.name, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
            "tok_s": medians, "rounds": runs, "first_token_s_1_client": statistics.median(first_token),
            "server_vs_in_process": medians["server, 1 client"] / medians["in-process"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results[0]["tok_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        ax.bar([i + (k - 1) * width for i in range(len(results))], [r["tok_s"][kind] for r in results], width, label=kind)
    ax.set_xticks(range(len(results)), [r["artifact"] for r in results])
    ax.set_ylabel("generated tokens / s (median)")
    ax.set_yscale("log")
    ax.set_title("moetvm serve on loopback vs in-process decode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, action="append", help="artifact(s) to serve (default: see above)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = [measure(art, args.rounds, args.max_tokens, args.prompt_tokens) for art in args.artifact or default_artifacts()]
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, OUT / "serve.png")
    print(f"{'artifact':22s} {'in-process':>11s} {'1 client':>9s} {'8 clients':>10s} {'first token':>12s}  (tok/s, medians)")
    for r in results:
        t = r["tok_s"]
        print(f"{r['artifact']:22s} {t['in-process']:11.1f} {t['server, 1 client']:9.1f} {t['server, 8 clients']:10.1f} "
              f"{r['first_token_s_1_client'] * 1000:10.0f} ms")
    print(f"wrote {OUT / 'results.json'} and {OUT / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
