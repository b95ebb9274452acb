"""The `moetvm` command line. Compile-side commands import torch lazily, so `run`, `inspect`
and `targets` work on a board that has only the runtime installed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from moetvm.artifact import KV_DTYPES, QUANT_SCHEMES, ROUTING_MODES, read_manifest
from moetvm.errors import MoetvmError, one_line
from moetvm.verify import AGREEMENT_BOUNDS, FP32_TOLERANCE, WINDOW


def _fail(message: str) -> None:
    raise click.ClickException(message)


class _Commands(click.Group):
    """Every user mistake the project can name (a MoetvmError) and every OS refusal on a path
    the user gave becomes one line and exit 1, here, for every command: a new error class
    cannot escape as a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad option value: the one line, without the usage banner
            error = click.ClickException(one_line(e.format_message()))
            error.exit_code = e.exit_code
            raise error from None
        except MoetvmError as e:
            raise click.ClickException(one_line(e)) from None
        except OSError as e:
            if e.filename is None:
                raise
            raise click.ClickException(one_line(f"{e.filename}: {e.strerror or e}")) from None


@click.group(cls=_Commands)
@click.version_option(package_name="moetvm", prog_name="moetvm")
def main():
    """Compile PyTorch Mixture-of-Experts models with Apache TVM and run them with an expert cache."""


@main.command()
def targets():
    """List the known deployment targets."""
    from moetvm.targets import get_target, known_targets

    for name in sorted(known_targets()):
        t = get_target(name)
        kind = t.tvm_target.get("kind")
        click.echo(f"{name:14s} {kind:5s} budget {t.memory_budget / 2**30:.1f} GiB  {t.description}")


@main.command("compile")
@click.argument("model")
@click.option("--target", "targets", multiple=True, default=["host"], show_default=True,
              help="target name (see `moetvm targets`); repeated, OUT holds an artifact per target, "
                   "from one read of the weights")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="artifact directory")
@click.option("--quant", type=click.Choice([*QUANT_SCHEMES, "auto", "keep"]), default="fp32", show_default=True,
              help="expert weight precision; auto plans it per expert from calibration text; keep stores the checkpoint's")
@click.option("--group-size", default=32, show_default=True, help="int4 group size (input rows per scale/zero)")
@click.option("--int4-symmetric", is_flag=True,
              help="int4 without zero points (llama.cpp's q4_0, MLC-LLM's q4f16_1): 4.5 bits a weight at "
                   "group 32 against 4.75, a little less exact")
@click.option("--router-quant", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True)
@click.option("--dense-quant", type=click.Choice(QUANT_SCHEMES), default=None,
              help="precision of the dense part's linear layers, LM head and embeddings "
                   "[default: as --quant; fp32 with auto]")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default=None,
              help="keys and values the LM caches; int8: a quarter of float32's bytes, quantized per "
                   "position [default: int8 when the dense part is int8 or int4, float32 when fp32, "
                   "else float16]")
@click.option("--weight-budget", default=None, help="auto: expert bytes allowed (bytes or % of fp32)")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="text profiling expert usage (preload order) and planning auto precision "
                   "(default for the reference model: first half of its held-out text)")
@click.option("--routing", type=click.Choice(ROUTING_MODES), default="learned", show_default=True,
              help="learned router, or a fixed pattern (no router at run time, exact prefetch)")
@click.option("--tile", default=16, show_default=True, help="tiling: positions per expert set")
@click.option("--cycle-dwell", default=8, show_default=True, help="cycle: time steps per expert set")
@click.option("--mask-below", type=float, default=None,
              help="mask and prune experts taking less than this share of their layer's routing")
@click.option("--tuning-db", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="MetaSchedule database from `moetvm tune`: tuned kernels where it has records")
@click.option("--dense-fallback", is_flag=True, help="add a mean expert per layer for `run --fallback dense`")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Ed25519 private key (from `moetvm keygen`) to sign the artifact with")
@click.option("--encrypt-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="file of 32 random bytes (head -c 32 /dev/urandom > key): weight files stored encrypted "
                   "(AES-256-GCM); run/serve need the same file")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x16",
              help="ONNX models: fixed shape for an input with symbolic dimensions (repeatable)")
@click.option("--quiet", is_flag=True, help="no progress lines")
def compile_cmd(model, targets, out, quant, group_size, int4_symmetric, router_quant, dense_quant, kv_dtype, weight_budget, calibration, routing, tile,
                cycle_dwell, mask_below, tuning_db, dense_fallback, sign_key, encrypt_key, input_shapes, quiet):
    """Compile MODEL ('reference', a checkpoint path, hf:DIR or an ONNX file, *.onnx) into an
    artifact directory. Everything that can be checked is checked before the work starts; the
    new artifact replaces OUT only once validated (and signed), and only if OUT is empty or
    holds a moetvm artifact."""
    started = time.perf_counter()
    import moetvm.compiler  # noqa: F401 - first: it prepares TVM's CUDA build before TVM loads
    from moetvm.compiler import BuildTarget, CompileOptions
    from moetvm.output import check_output

    options = CompileOptions(quant=quant, group_size=group_size, int4_symmetric=int4_symmetric,
                             router_quant=router_quant, dense_quant=dense_quant,
                             kv_dtype=kv_dtype, weight_budget=weight_budget, routing=routing, tile=tile,
                             cycle_dwell=cycle_dwell, mask_below=mask_below, tuning_db=tuning_db,
                             dense_fallback=dense_fallback, sign_key=sign_key, encrypt_key=encrypt_key)
    build_targets = [BuildTarget.resolve(t) for t in targets]
    model_path = model[3:] if model.startswith("hf:") else None if model == "reference" else model
    inputs = (model_path, calibration, tuning_db, sign_key, encrypt_key)
    if len(targets) == 1:
        check_output(out, inputs=inputs)
    onnx = model.endswith(".onnx")
    if onnx and len(targets) > 1:
        _fail("several --target values share an expert pass over a PyTorch model; compile an ONNX model once per target")
    if onnx and calibration:
        _fail("--calibration runs the PyTorch model; not available for an ONNX model")
    if not onnx and input_shapes:
        _fail("--input-shape applies to ONNX models only")
    if onnx and not Path(model).is_file():
        _fail(f"model {model!r}: no such ONNX file")
    if onnx:
        from moetvm.compiler import compile_onnx

        try:
            shapes = {name: [int(d) for d in dims.split("x")]
                      for name, _, dims in (s.partition("=") for s in input_shapes)}
        except ValueError:
            _fail(f"--input-shape takes NAME=1x16, got {list(input_shapes)}")
        if any(d <= 0 for dims in shapes.values() for d in dims):
            _fail(f"--input-shape dimensions must be positive, got {list(input_shapes)}")
        paths = [compile_onnx(model, build_targets[0], out, options, input_shapes=shapes, progress=not quiet)]
    else:
        from moetvm.compiler import compile_model
        from moetvm.compiler.models import calibration_windows, load_model_source

        # The shipped model profiles on its own text; auto plans on it unless given another.
        calibrated = quant == "auto" or calibration is not None or model == "reference"
        tokens = calibration_windows(calibration) if calibrated else None
        options.check_calibration(tokens)
        # Without calibration nothing runs the PyTorch model: its weights are streamed from the checkpoint.
        torch_model = load_model_source(model, stream=tokens is None)
        if len(build_targets) == 1:
            paths = [compile_model(torch_model, target=build_targets[0], out=out, options=options, calibration=tokens,
                                   name=model, source=model, progress=not quiet)]
        else:
            from moetvm.compiler import compile_targets

            paths = list(compile_targets(torch_model, build_targets, out, options, inputs=inputs, calibration=tokens,
                                         name=model, source=model, progress=not quiet).values())
    for path in paths:
        m = read_manifest(path)
        size = sum(f.size for f in m.files())
        click.echo(f"wrote {path} ({size / 1e6:.2f} MB, {len(m.libraries)} libraries, "
                   f"{sum(len(layer.experts) for layer in m.moe_layers)} experts{', signed' if sign_key else ''}"
                   f"{', weights encrypted' if encrypt_key else ''})", err=True)
    click.echo(f"compiled in {time.perf_counter() - started:.1f}s", err=True)


@main.command()
@click.argument("model")
@click.option("--target", default="host", show_default=True)
@click.option("--trials", default=64, show_default=True, help="measured candidates per distinct kernel")
@click.option("--db", type=click.Path(path_type=Path), required=True, help="database directory (TVM JSON format)")
@click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker whose boards measure candidates")
@click.option("--key", default=None, help="device key at the tracker (default: the target's)")
@click.option("--quant", type=click.Choice(QUANT_SCHEMES), default="fp32", show_default=True)
@click.option("--group-size", default=32, show_default=True)
@click.option("--int4-symmetric", is_flag=True, help="int4 without zero points (as compile --int4-symmetric)")
@click.option("--only", "parts", multiple=True, type=click.Choice(["segments", "routers", "experts"]),
              help="tune only these parts (repeatable; default all)")
def tune(model, target, trials, db, tracker, key, quant, group_size, int4_symmetric, parts):
    """Tune every distinct kernel of MODEL for TARGET with MetaSchedule + XGBoost (resumable)."""
    from moetvm.compiler import tune_model
    from moetvm.compiler.models import load_model_source
    from moetvm.compiler import BuildTarget, CompileOptions

    if trials < 1:
        _fail(f"--trials must be at least 1, got {trials}")
    if db.exists() and not db.is_dir():
        _fail(f"--db {db}: is a file, not a database directory")
    options = CompileOptions(quant=quant, group_size=group_size, int4_symmetric=int4_symmetric)
    # Tuning needs the model's shapes, never its weights: a transformers checkpoint is streamed.
    report = tune_model(load_model_source(model, stream=True), target=BuildTarget.resolve(target), options=options, db=db,
                        trials=trials, tracker=tracker, key=key, parts=tuple(parts) or ("segments", "routers", "experts"))
    click.echo(str(report))


@main.command("export-onnx")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--model", "source", default="reference", show_default=True,
              help="'reference', a checkpoint path or hf:DIR (a local transformers model directory)")
@click.option("--shape", default="1x16", show_default=True, help="token ids BATCHxSEQ the graphs are exported at")
@click.option("--tolerance", default=1e-4, show_default=True, help="max relative error of a part (ORT vs PyTorch)")
def export_onnx(directory, source, shape, tolerance):
    """Write every part of MODEL as ONNX files into DIRECTORY (dense segments, routers, one expert
    per workload, and the whole model as model.onnx) with an index, parts.json; run each in ONNX
    Runtime on random inputs against PyTorch. Exit 1 above tolerance."""
    from moetvm.compiler.models import load_model_source
    from moetvm.compiler.onnx_export import export_parts

    try:
        batch, seq = (int(d) for d in shape.split("x"))
    except ValueError:
        _fail(f"--shape takes BATCHxSEQ, got {shape!r}")
    if batch < 1 or seq < 1:
        _fail(f"--shape {shape}: batch and sequence must be at least 1")
    if directory.exists() and not directory.is_dir():
        _fail(f"{directory}: is a file; export-onnx writes into a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "parts.json").is_file():
        _fail(f"{directory}: holds files that are not an earlier export (no parts.json); refusing to write over them")
    rows = export_parts(load_model_source(source), directory, (batch, seq), source=source)
    describe = lambda specs: ", ".join(f"{t['name']}{t['shape']}" for t in specs)  # noqa: E731
    click.echo(f"{'part':24s} {'file':30s} {'max rel error':>13s}  inputs")
    for r in rows:
        error = "n/a" if r["max_relative_error"] is None else f"{r['max_relative_error']:.2e}"
        click.echo(f"{r['part']:24s} {r['file']:30s} {error:>13s}  {describe(r['inputs'])}")
    worst = max((r["max_relative_error"] or 0.0) for r in rows)
    click.echo(f"wrote {len(rows)} ONNX files and parts.json to {directory}; worst error {worst:.2e} "
               f"(tolerance {tolerance:.0e})", err=True)
    sys.exit(0 if worst <= tolerance else 1)


def _runtime_only() -> None:
    """`run`, `trace` and `serve` need neither torch nor TVM's compiler, and a board has neither,
    but tvm_ffi imports torch whenever it is installed (~300 MB of RSS, seconds of start-up).
    Unless something imported it already, this process does without: an import of torch raises
    ImportError. (The runtime reaches TVM's runtime library without the `tvm` package on a CPU:
    runtime/tvm_runtime.py.)"""
    if "tvm" not in sys.modules:
        sys.modules.setdefault("torch", None)


def _load(directory: Path, cache_budget: str, **options):
    from moetvm.runtime import load_model

    return load_model(directory, cache_budget=cache_budget, **options)


def _token_ids(token_ids: str) -> list[int]:
    """`--token-ids 1,2,3` as a list of ids."""
    parts = [t.strip() for t in token_ids.split(",")]
    if not token_ids.strip() or not all(parts):
        _fail(f"--token-ids: expected comma-separated integers, got {token_ids!r}")
    try:
        ids = [int(t) for t in parts]
    except ValueError:
        _fail(f"--token-ids: expected comma-separated integers, got {token_ids!r}")
    if any(not 0 <= i < 2**63 for i in ids):
        _fail(f"--token-ids: ids must be non-negative 64-bit integers, got {token_ids!r}")
    return ids


def _check_text(option: str, text: str) -> None:
    """A one-line refusal for text that is not UTF-8 (bytes a shell passed through undecoded)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{option}: not valid UTF-8 text (give token ids with --token-ids instead)")


def _needs_tokenizer(tokenizer, directory: Path, what: str):
    """`tokenizer`, or a one-line refusal naming what needed it when the artifact ships none."""
    if tokenizer is None:
        _fail(f"{directory}: this artifact ships no tokenizer (its model directory had no tokenizer.json), so "
              f"{what} cannot be used: give token ids (--token-ids), or recompile with the tokenizer beside the model")
    return tokenizer


def print_run_report(report: dict, fallback: str = "error") -> None:
    """The human form of `run --json`'s report. Fallbacks, when any happened, are said on
    stderr: an answer computed without some experts must not pass unnoticed."""
    lat = report["latency_ms"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    click.echo(f"decode latency/token  p50 {fmt(lat['p50'])} ms  p95 {fmt(lat['p95'])} ms  p99 {fmt(lat['p99'])} ms"
               f"  ({report['decode_tokens']} tokens; prefill {report['prefill_ms'][0]:.1f} ms)")
    click.echo(f"expert cache          hit rate {report['hit_rate']:.1%}  loads {report['expert_loads']}  "
               f"evictions {report['evictions']}  load time {report['expert_load_ms']:.1f} ms")
    click.echo(f"expert memory         budget {report['cache_budget_bytes'] / 1e6:.2f} MB of "
               f"{report['total_expert_bytes'] / 1e6:.2f} MB; resident {report['resident_expert_bytes'] / 1e6:.2f} MB")
    if report.get("lookup_tables"):  # an untied input embedding table, held by the slices tokens reached
        lt = report["lookup_tables"]
        click.echo(f"embedding table       {lt['slices_read']} of {lt['slices']} slices read: "
                   f"{lt['resident_bytes'] / 1e6:.2f} of {lt['bytes'] / 1e6:.2f} MB")
    t = report["time_ms"]
    click.echo(f"time split            segments {t['segments']:.1f} ms  routing {t['routing']:.1f} ms  "
               f"experts {t['experts']:.1f} ms (incl. loads)"
               + (f"  whole decode steps {t['decode_steps']:.1f} ms" if t.get("decode_steps") else ""))
    if report.get("outside_compiled_share") is not None:
        click.echo(f"outside compiled code {report['outside_compiled_share']:.0%} of decode time "
                   f"({report['compiled_calls']} calls into compiled functions)")
    p = report["prefetch"]
    if p["enabled"]:
        fmt_pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
        click.echo(f"prefetch              {p['loads']} loads, {p['useful']} useful (precision {fmt_pct(p['precision'])}, "
                   f"recall {fmt_pct(p['recall'])}), {p['wasted']} wasted, {p['skipped']} skipped, {p['failed']} failed")
    fallbacks = sum(report["fallbacks"].values())
    if fallbacks:
        click.echo(f"FALLBACKS             {fallbacks} token-expert slots served by --fallback {fallback}: "
                   f"{'; '.join(report['fallback_errors'][:3])}", err=True)
    click.echo(f"peak RSS              {report['peak_rss_mb']:.0f} MB")


def sampling_options(command):
    """`run`'s sampling options, named as in llama.cpp (and as the server's JSON fields)."""
    for option in reversed([
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="sampling temperature; 0 is greedy"),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="keep the k likeliest tokens (0: all)"),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
                     help="keep the likeliest tokens summing to this probability"),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="> 1 discourages tokens already in the prompt or output"),
        click.option("--seed", type=click.IntRange(min=0, max=2**64 - 1), default=None, help="random seed for sampling"),
    ]):
        command = option(command)
    return command


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--prompt", default="def ", show_default=True, help="text, encoded with the artifact's tokenizer")
@click.option("--token-ids", default=None, help="the prompt as comma-separated token ids instead")
@click.option("--chat", is_flag=True, help="--prompt is a user message, rendered with the model's chat template")
@click.option("--system", default=None, help="with --chat: a system message before it")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=0))
@sampling_options
@click.option("--stop", multiple=True, help="stop before this text (repeatable)")
@click.option("--ignore-eos", is_flag=True, help="go on past the end-of-sequence token")
@click.option("--cache-budget", default="25%", show_default=True, help="bytes, size (64MB) or percent of all experts")
@click.option("--prefetch/--no-prefetch", default=False, show_default=True,
              help="load each next layer's predicted experts in the background (off by default: "
                   "slower in every configuration measured, docs/decode-history.md)")
@click.option("--preload", default="auto", show_default=True,
              help="fraction of experts, hottest first, pinned at start; auto: the hottest that leave the rest "
                   "room for a token's experts, at most half the budget")
@click.option("--storage-mbps", type=float, default=None, help="throttle expert reads to simulate slow storage")
@click.option("--fallback", type=click.Choice(["error", "skip", "dense"]), default="error", show_default=True,
              help="when an expert cannot be loaded: fail, renormalise over the rest, or use the dense stand-in")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ed25519 public key; the artifact must be signed by one of these (repeatable)")
@click.option("--decrypt-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="key file of an artifact compiled with --encrypt-key [default: $MOETVM_DECRYPT_KEY]")
@click.option("--expert-source", default=None, metavar="URL",
              help="fetch expert files missing from the artifact from this URL (moetvm serve-experts DIR)")
@click.option("--expert-store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="where fetched experts are kept [default: ~/.cache/moetvm/experts]")
@click.option("--expert-store-budget", default="100%", show_default=True,
              help="bytes the store keeps (bytes, size or percent of all experts); least recently used go first")
@click.option("--min-expert-weight", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="skip a token's selected experts below this share of its routing weight (renormalising the rest)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout, at the end")
def run(directory, prompt, token_ids, chat, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
        stop, ignore_eos, cache_budget, prefetch, preload, storage_mbps, fallback, trusted_keys, decrypt_key,
        expert_source, expert_store, expert_store_budget, min_expert_weight, as_json):
    """Generate from a compiled LM artifact, text streamed as it comes, then cache and latency stats."""
    _runtime_only()
    if chat and token_ids is not None:
        _fail("--chat takes the user's message as --prompt, not --token-ids")
    _check_text("--prompt", prompt)
    if system is not None:
        _check_text("--system", system)
    if system is not None and not chat:
        _fail("--system goes with --chat")
    if preload != "auto":
        try:
            preload = float(preload)
        except ValueError:
            _fail(f"--preload takes a fraction of the experts in [0, 1] or auto, got {preload!r}")
    model = _load(directory, cache_budget, prefetch=prefetch, preload=preload, storage_mbps=storage_mbps,
                  fallback=fallback, trusted_keys=list(trusted_keys) or None, decrypt_key=decrypt_key,
                  min_expert_weight=min_expert_weight, expert_source=expert_source, expert_store=expert_store,
                  expert_store_budget=expert_store_budget)
    if model.manifest.kind != "causal_lm":
        _fail(f"{directory}: `run` needs a causal LM artifact, this one is a {model.manifest.kind}")
    if token_ids is not None:
        source = _token_ids(token_ids)
    elif chat:
        source = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    else:
        source = prompt
    generation = model.stream(source, max_new_tokens, stop=stop, ignore_eos=ignore_eos, temperature=temperature,
                              top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    if not as_json:
        if token_ids is not None:
            click.echo(token_ids + " -> ", nl=False)
        elif not chat:
            click.echo(prompt, nl=False)
    for token in generation:
        if not as_json:
            click.echo(str(token.id) + "," if token_ids is not None and model.tokenizer is None else token.text, nl=False)
    report = {"text": generation.text if model.tokenizer is not None else None, "prompt": token_ids or prompt,
              "prompt_tokens": generation.prompt_tokens, "new_ids": generation.token_ids,
              "finish_reason": generation.finish_reason, **model.stats()}
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo()
    click.echo("-" * 60)
    print_run_report(report, fallback)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free one)")
@click.option("--api-key", envvar="MOETVM_API_KEY", default=None,
              help="require `Authorization: Bearer KEY` (or set MOETVM_API_KEY)")
@click.option("--model-name", default=None, help="the model's id in the API [default: the artifact's model name]")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="requests waiting at most; more get HTTP 503")
@click.option("--cache-budget", default="100%", show_default=True, help="bytes, size (64MB) or percent of all experts")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ed25519 public key; the artifact must be signed by one of these (repeatable)")
@click.option("--decrypt-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="key file of an artifact compiled with --encrypt-key [default: $MOETVM_DECRYPT_KEY]")
@click.option("--expert-source", default=None, metavar="URL",
              help="fetch expert files missing from the artifact from this URL (moetvm serve-experts DIR)")
@click.option("--expert-store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="where fetched experts are kept [default: ~/.cache/moetvm/experts]")
@click.option("--expert-store-budget", default="100%", show_default=True,
              help="bytes the store keeps (bytes, size or percent of all experts); least recently used go first")
def serve(directory, host, port, api_key, model_name, max_queue, cache_budget, trusted_keys, decrypt_key, expert_source,
          expert_store, expert_store_budget):
    """Serve an LM artifact over HTTP with an OpenAI-compatible API (/v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics)."""
    _runtime_only()
    from moetvm.runtime.server import serve as serve_model

    model = _load(directory, cache_budget, trusted_keys=list(trusted_keys) or None, decrypt_key=decrypt_key,
                  expert_source=expert_source, expert_store=expert_store, expert_store_budget=expert_store_budget)
    if model.manifest.kind != "causal_lm":
        _fail(f"{directory}: `serve` needs a causal LM artifact, this one is a {model.manifest.kind}")
    model_id = model_name or model.manifest.model.name or directory.name
    text = "text and token ids" if model.tokenizer is not None else "token ids only (no tokenizer in the artifact)"
    _listen(lambda: serve_model(model, host, port, model_id=model_id, api_key=api_key, max_queue=max_queue,
                                ready=lambda bound: click.echo(f"serving {model_id} ({text}) on http://{host}:{bound}/v1",
                                                               err=True)), host, port)


def _listen(run_server, host: str, port: int) -> None:
    """Run a server until Ctrl-C; an address it cannot bind is a one-line error."""
    try:
        run_server()
    except OSError as e:
        _fail(f"cannot listen on {host}:{port} ({e.strerror or e})")
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--rpc", "rpc_addr", default=None, metavar="HOST:PORT", help="a board's RPC server (direct connection)")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="a TVM RPC tracker that boards registered with")
@click.option("--key", default=None,
              help="device key, as in TVM. --tracker: the key the boards registered under (default: the "
                   "artifact's target's rpc key: rasp4 for cortex-a72, host for host). --rpc: the board's "
                   "--key (default: none, as a board started without --key expects)")
@click.option("--prompt", default="def ", show_default=True, help="text, encoded here with the artifact's tokenizer")
@click.option("--token-ids", default=None, help="the prompt as comma-separated token ids instead")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--cache-budget", default=None, help="default: the target's memory budget")
@click.option("--timeout", default=600.0, show_default=True, help="seconds before the board session is dropped")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="Ed25519 public key; refuse to upload unless the artifact is signed by one of these (repeatable)")
def deploy(directory, rpc_addr, tracker, key, prompt, token_ids, max_new_tokens, cache_budget, timeout, trusted_keys):
    """Upload an artifact to a board over TVM RPC, run it there, print the JSON report (with the
    text, decoded by the artifact's tokenizer)."""
    from moetvm.runtime.remote import deploy as deploy_artifact
    from moetvm.runtime.tokenizer import load_tokenizer

    _check_text("--prompt", prompt)
    tokenizer = load_tokenizer(directory, read_manifest(directory))  # the bytes the board gets, verified
    prompt_ids = _token_ids(token_ids) if token_ids is not None else \
        _needs_tokenizer(tokenizer, directory, "a text --prompt").encode(prompt)
    try:  # address, signature and key are checked before connecting; then the board's own cause
        report = deploy_artifact(directory, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                                 cache_budget=cache_budget, rpc_addr=rpc_addr, tracker=tracker, key=key,
                                 timeout=timeout, trusted_keys=list(trusted_keys) or None)
    except MoetvmError as e:
        _fail(one_line(e))
    report = {"text": tokenizer.decode(report["new_ids"]) if tokenizer else None, "prompt": token_ids or prompt, **report}
    click.echo(json.dumps(report))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="text to run, token by token")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="trace file to write")
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--window", default=128, show_default=True, type=click.IntRange(min=1),
              help="tokens per KV-cache window before restarting")
def trace(directory, text, out, max_tokens, window):
    """Record a routing trace: decode TEXT token by token (teacher-forced) and log, per token
    and MoE layer, the chosen experts, their weights and the lookahead predictions."""
    _runtime_only()
    import numpy as np

    from moetvm.runtime.trace import RoutingTrace, TraceError

    if out.is_dir():
        _fail(f"-o {out}: is a directory; give the trace file's path")
    if out.exists():
        try:
            RoutingTrace.load(out)
        except TraceError:
            _fail(f"-o {out}: exists and is not a routing trace; refusing to replace it")
    model = _load(directory, "100%")
    if model.manifest.kind != "causal_lm":
        _fail("`trace` needs a causal LM artifact")
    tokenizer = _needs_tokenizer(model.tokenizer, directory, "--text")
    try:
        content = text.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        _fail(f"--text {text}: not UTF-8 text")
    tokens = np.asarray(tokenizer.encode(content), dtype=np.int64)[:max_tokens]
    if not len(tokens):
        _fail(f"--text {text}: empty")
    model.start_trace()
    for start in range(0, len(tokens), window):
        cache = model.new_cache()
        for t in tokens[start : start + window]:
            _, cache = model.step(np.array([[t]], dtype=np.int64), cache)
    recorded = model.stop_trace()
    recorded.save(out)
    click.echo(f"wrote {out}: {len(recorded.steps)} steps x {recorded.n_layers} layers", err=True)


@main.command()
@click.argument("trace_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--budget", "budgets", multiple=True, default=["25%"], show_default=True,
              help="bytes, size (64MB) or percent of all experts, as run's --cache-budget; repeat for several")
@click.option("--profile", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="a calibration trace for the pinned hot set (default: the trace itself)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout (first budget)")
def simulate(trace_file, budgets, profile, as_json):
    """Replay a routing trace against cache policies: LRU, LFU, pinned, runtime, Belady's MIN."""
    from moetvm.budget import parse_budget
    from moetvm.runtime.simulator import simulate as run_simulation
    from moetvm.runtime.trace import RoutingTrace

    recorded = RoutingTrace.load(trace_file)
    calibration = RoutingTrace.load(profile) if profile else None
    for budget in budgets:  # every budget checked before any replay
        parse_budget(budget, recorded.budget_base)
    for budget in budgets:
        result = run_simulation(recorded, budget, profile=calibration)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(f"budget {budget}: {result['lru']['budget_bytes'] / 1e6:.2f} MB of "
                   f"{recorded.total_bytes / 1e6:.2f} MB, {result['lru']['accesses']} expert accesses")
        click.echo(f"  {'policy':8s} {'hit rate':>8s} {'hits':>6s} {'misses':>6s} {'MB loaded':>9s}")
        for name, r in result.items():
            extra = ""
            if name == "runtime" and r.get("prefetch_precision") is not None:
                extra = f"  prefetch precision {r['prefetch_precision']:.0%} recall {r['prefetch_recall']:.0%}"
            if name == "belady" and not r.get("exact", True):
                extra = "  (mixed sizes: a bound, not exact)"
            click.echo(f"  {name:8s} {r['hit_rate']:8.1%} {r['hits']:6d} {r['misses']:6d} {r['bytes_loaded'] / 1e6:9.2f}{extra}")


@main.command()
@click.argument("private_key", type=click.Path(path_type=Path))
@click.argument("public_key", type=click.Path(path_type=Path))
def keygen(private_key, public_key):
    """Make an Ed25519 key pair for signing artifacts (private key written with mode 0600)."""
    from moetvm.signing import fingerprint, generate_keypair

    generate_keypair(private_key, public_key)
    click.echo(f"wrote {private_key} (keep secret) and {public_key}; fingerprint {fingerprint(public_key)}")


@main.command()
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def diff(old, new, as_json):
    """List experts and libraries that changed between two artifacts (by SHA-256): what an
    update must ship."""
    from moetvm.diff import diff_artifacts, format_diff

    d = diff_artifacts(old, new)
    click.echo(json.dumps(d) if as_json else format_diff(d))


@main.command("serve-experts")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free one)")
def serve_experts_cmd(directory, host, port):
    """Serve an artifact's files over HTTP as an expert source for `run/serve --expert-source URL`
    (only the files its manifest lists)."""
    from moetvm.runtime.expert_store import serve_experts

    _listen(lambda: serve_experts(directory, host, port, ready=lambda bound: click.echo(
        f"serving experts of {directory} on http://{host}:{bound}/", err=True)), host, port)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="bundle file to write (new)")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="the version the board has: the bundle holds only what differs from it (a delta)")
def pack(directory, out, base):
    """Write an artifact as one zstd-compressed bundle to ship (or, with --base, a delta update)."""
    from moetvm.bundle import pack as pack_bundle

    r = pack_bundle(directory, out, base)
    click.echo(f"wrote {out}: {r['kind']} bundle, {r['files']} files, {r['bytes'] / 1e6:.2f} MB of the artifact's "
               f"{r['artifact_bytes'] / 1e6:.2f} MB, {r['bundle_bytes'] / 1e6:.2f} MB compressed", err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="artifact directory")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ed25519 public key; the bundle's manifest must be signed by one of these (repeatable)")
def unpack(bundle, out, trusted_keys):
    """Unpack a full bundle into an artifact directory (verified whole before it takes OUT's place)."""
    from moetvm.bundle import unpack as unpack_bundle

    click.echo(f"unpacked {unpack_bundle(bundle, out, list(trusted_keys) or None)}", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("delta", type=click.Path(path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ed25519 public key; the new manifest must be signed by one of these (repeatable)")
def update(directory, delta, trusted_keys):
    """Apply a delta bundle (`pack NEW --base OLD`) to the artifact at DIRECTORY, atomically:
    the new version is assembled and verified beside it, then replaces it in one rename."""
    from moetvm.bundle import update as update_artifact

    click.echo(f"updated {update_artifact(directory, delta, list(trusted_keys) or None)}", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def inspect(directory):
    """Summarise an artifact."""
    from moetvm.artifact import read_manifest

    m = read_manifest(directory)
    click.echo(f"artifact   {directory}  (format {m.format_version}, {m.kind})")
    click.echo(f"model      {m.model.name}: {m.model.parameters / 1e6:.2f}M parameters, "
               f"{len(m.moe_layers)} MoE layers")
    click.echo(f"target     {m.target.name}: {json.dumps(m.target.tvm_target)}")
    click.echo(f"compiled   {m.compile_info}")
    click.echo("libraries")
    for lib in m.libraries:
        click.echo(f"  {lib.file.path:45s} {lib.file.size / 1e3:9.1f} KB  {', '.join(lib.functions)}")
    click.echo("workloads")
    for w in m.workloads:
        users = sum(e.workload == w.id for layer in m.moe_layers for e in layer.experts)
        click.echo(f"  {w.id:30s} d_model {w.d_model} d_ff {w.d_ff} {w.dtype}: {users} experts share it")
    click.echo("program")
    for step in m.program:
        click.echo(f"  {step.op:8s} {step.name:10s} ({len(step.inputs)} in -> {len(step.outputs)} out)")
    for layer in m.moe_layers:
        r = layer.router
        total = sum(e.weight_bytes for e in layer.experts)
        click.echo(f"layer {layer.layer}: {r.n_experts} experts, top-{r.top_k} {r.score_fn}"
                   f"{' renormalised' if r.normalize else ''}, {total / 1e6:.2f} MB of expert weights")
    size = sum(f.size for f in m.files())
    click.echo(f"total      {size / 1e6:.2f} MB in {len(m.files())} files")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--model", "source", default=None, help="PyTorch source (default: the one recorded at compile)")
@click.option("--text", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="text to run, as byte tokens (default: shipped held-out text)")
@click.option("--windows", default=4, show_default=True, type=click.IntRange(min=1),
              help=f"number of {WINDOW}-byte windows of the text")
@click.option("--generate", "gen_tokens", default=32, show_default=True, type=click.IntRange(min=0),
              help="greedy tokens to compare")
@click.option("--tolerance", type=float, default=None,
              help=f"max logit error relative to the logits' magnitude (default {FP32_TOLERANCE:.0e} for fp32 artifacts; "
                   "quantized ones are judged by --min-agreement)")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="quantized artifacts: least top-1 agreement with PyTorch (default by precision: "
                   + ", ".join(f"{k} {v:.0%}" for k, v in AGREEMENT_BOUNDS.items()) + ")")
@click.option("--cache-budget", default="25%", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def verify(directory, source, text, windows, gen_tokens, tolerance, min_agreement, cache_budget, as_json):
    """Run the artifact and its PyTorch source side by side; exit 1 when they disagree. An fp32
    artifact must match within --tolerance with identical greedy tokens; a quantized one must
    agree on the top-1 token at least --min-agreement of the time."""
    import numpy as np

    from moetvm.compiler.models import HELDOUT_TEXT, load_model_source
    from moetvm.verify import PROMPT_TOKENS, verify_against_source

    model = _load(directory, cache_budget)
    if model.manifest.kind != "causal_lm":
        _fail(f"{directory}: verify compares a causal LM with its PyTorch source; this is a {model.manifest.kind} "
              f"artifact (an ONNX import is checked by `moetvm export-onnx` against ONNX Runtime)")
    if tolerance is not None and not tolerance > 0:
        _fail(f"--tolerance must be positive, got {tolerance}")
    source = source or model.manifest.model.source
    if not source:
        _fail("the artifact records no PyTorch source; pass --model")
    data = np.frombuffer((text or HELDOUT_TEXT).read_bytes(), dtype=np.uint8).astype(np.int64)
    if len(data) < WINDOW + 1:
        _fail(f"--text {text}: {len(data)} bytes; at least {WINDOW + 1} are needed (one {WINDOW}-token window)")
    vocab = model.manifest.model.vocab_size
    if vocab and data.max() >= vocab:
        _fail(f"--text holds byte values up to {data.max()}, outside this model's {vocab}-token vocabulary")
    model.check_generation(PROMPT_TOKENS, gen_tokens)
    report = verify_against_source(model, load_model_source(source), data, windows, gen_tokens, tolerance, min_agreement)
    worst, total, ok = report["max_relative_logit_error"], report["tokens_compared"], report["ok"]
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"max relative logit error {worst:.2e} over {total} tokens")
        click.echo(f"argmax agreement         {report['argmax_agreement']:.2%}")
        click.echo(f"greedy generation        {report['greedy_tokens_equal']}/{gen_tokens} tokens identical")
        click.echo(f"{'OK' if ok else 'MISMATCH'} ({report['criterion']})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
