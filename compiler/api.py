"""The compiler's interface: `compile_model` (PyTorch) and `compile_onnx` (ONNX) -> an artifact
directory, `tune_model` -> a MetaSchedule database. Each is a front door (import_torch.py,
onnx_frontend.py) into one back end (plan.py, writer.py), with options checked once
(options.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from moetvm.errors import UsageError
from moetvm.targets import DeployTarget

from .import_torch import import_torch
from .build_target import BuildTarget
from .options import CompileOptions
from moetvm.output import OutputError, check_output
from .plan import Progress
from .quantized import QuantizedNumbers
from .writer import relax_libraries, write_artifact


def compile_model(
    model: nn.Module,
    example_inputs: tuple = (),
    target: str | DeployTarget | BuildTarget = "host",
    out: str | Path = "artifact",
    options: CompileOptions | None = None,
    *,
    calibration: np.ndarray | None = None,
    name: str | None = None,
    description: str = "",
    source: str | None = None,
    tokenizer: str | Path | None = None,
    progress: bool = True,
    quantized: QuantizedNumbers | None = None,
    **option_fields,
) -> Path:
    """Compile a supported MoE model into an artifact directory and return its path.

    Supported: a causal LM following the KV-cached LM protocol (`step`, `kv_layout`; logits out),
    a transformers `*ForCausalLM` of a supported MoE family (wrapped in that protocol by
    compiler/models/hf.py), or a single MoE block taking hidden states (`example_inputs=(hidden,)`).

    options: a CompileOptions (quantization, routing, tuning database, signing key; see there);
    its fields may also be given as keywords (`quant="int4"`), which replace those of `options`.
    calibration: token windows (batch, seq) run through the model to profile expert usage (stored
    per expert, it orders the runtime's preload) and, for quant auto, hash routing or
    mask_below, to fit on.
    tokenizer: a directory holding the LM's tokenizer.json (and its configuration, chat
    template), copied into the artifact for text in and out; default: the model's own (the
    directory of an `hf:DIR` source, the reference model's bytes).

    Every option, the output path and the signing key are checked before any work starts; the
    new artifact is validated (manifest parsed, every file hashed, signature verified) before it
    replaces an old one at `out`, and `out` is replaced only when it holds a moetvm artifact.
    quantized: the weights' numbers shared with the other targets of compile_targets.
    """
    options = CompileOptions.of(options, **option_fields)
    options.check_calibration(calibration)
    check_output(out)
    target = BuildTarget.resolve(target)
    bar = Progress(progress, total=0)  # planning sizes it once the workloads are known
    p = import_torch(model, example_inputs, target, options, calibration, bar, name=name, description=description,
                     source=source, tokenizer=tokenizer)
    return write_artifact(p, out, options, bar, quantized)


def compile_targets(
    model: nn.Module,
    targets: Sequence[str | DeployTarget | BuildTarget],
    out: str | Path,
    options: CompileOptions | None = None,
    *,
    inputs: tuple[str | Path, ...] = (),
    progress: bool = True,
    **compile_fields,
) -> dict[str, Path]:
    """Compile one model for several targets: the artifact for each at `out`/<target name>,
    returned by name. What does not depend on the target is done once: every expert is read
    from its source and quantized once, its numbers kept in `out`/.quantized.partial/ until the
    last target has laid them out its own way (each target still traces the model and builds
    its own libraries). A compile stopped part-way keeps the targets done and the numbers made;
    run again, it reuses both. `inputs` (checkpoint, calibration text) may not lie inside
    `out`; the rest as compile_model."""
    resolved = [BuildTarget.resolve(t) for t in targets]
    names = [t.deploy.name for t in resolved]
    if not names:
        raise UsageError("compile_targets needs at least one target")
    if len(set(names)) < len(names):
        raise UsageError(f"targets {', '.join(names)}: each target once")
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"-o {out}: several targets write a folder of artifacts, one per target; "
                          f"{out} is {'a symbolic link' if out.is_symlink() else 'a file'}")
    for name in names:
        check_output(out / name, inputs=inputs)
    quantized = QuantizedNumbers(out / ".quantized.partial")
    paths = {}
    for i, (name, target) in enumerate(zip(names, resolved)):
        if progress:
            print(f"[target {i + 1}/{len(names)}] {name} -> {out / name}", file=sys.stderr, flush=True)
        paths[name] = compile_model(model, target=target, out=out / name, options=options, progress=progress,
                                    quantized=quantized, **compile_fields)
    quantized.finish()
    return paths


def compile_onnx(path: str | Path, target: str | DeployTarget | BuildTarget = "host", out: str | Path = "artifact",
                 options: CompileOptions | None = None, *, input_shapes: dict[str, list[int]] | None = None,
                 name: str | None = None, progress: bool = True, **option_fields) -> Path:
    """Compile an ONNX MoE model (fixed shapes; `input_shapes` fixes symbolic input dims) into a
    "graph" artifact. Options as in compile_model, less those an ONNX graph cannot take (see
    onnx_frontend.import_onnx)."""
    from .onnx_frontend import import_onnx

    options = CompileOptions.of(options, **option_fields)
    check_output(out, inputs=(path,))
    target = BuildTarget.resolve(target)
    bar = Progress(progress, total=0)  # planning sizes it once the blocks are found
    p = import_onnx(path, target, options, bar, input_shapes=input_shapes, name=name)
    return write_artifact(p, out, options, bar)


def tune_model(model: nn.Module, example_inputs: tuple = (), target: str | DeployTarget | BuildTarget = "host",
               options: CompileOptions | None = None, *, db: str | Path, trials: int = 64, tracker: str | None = None,
               key: str | None = None, parts: tuple[str, ...] = ("segments", "routers", "experts"),
               calibration: np.ndarray | None = None, progress: bool = True, **option_fields):
    """Tune every distinct kernel the compile with these `options` (as in compile_model) would
    build, with MetaSchedule + XGBoost, into TVM's JSON database at `db`; resumable. Boards are
    measured through TVM's RPC tracker (`tracker="HOST:PORT"`, `key`, default the target's).
    `parts` limits the libraries tuned (segments, routers, experts)."""
    from . import tuning

    options = CompileOptions.of(options, **option_fields)
    options.check_calibration(calibration)
    target = BuildTarget.resolve(target)
    # The tracker first (rpc_runner checks it gives a device under the key): an unreachable one
    # is a TuningError now, not after preparing the model and failing every measurement.
    runner = tuning.rpc_runner(tracker, key or target.deploy.rpc_key) if tracker else None
    # Before the trace: registering them parses TVMScript, whose inspect.stack() costs grow with
    # sys.modules; after torch.export's imports it took 19 s instead of 4.5 s.
    tuning.load_tensor_intrinsics(target.tvm)
    p = import_torch(model, example_inputs, target, options, calibration, Progress(progress, total=4))
    libs = {k: v for k, v in relax_libraries(p, decode_step=False).items()
            if (k if k in ("segments", "routers") else "experts") in parts}
    # Segments carry batch, sequence and past length: tune them at the decode shape (all 1);
    # routers and experts also at a prefill bucket.
    tasks = tuning.extract_tasks({k: v for k, v in libs.items() if k == "segments"}, target.tvm, buckets=(1,))
    tasks += tuning.extract_tasks({k: v for k, v in libs.items() if k != "segments"}, target.tvm)
    return tuning.tune(tasks, target.tvm, Path(db), trials, runner=runner, cross_compiler=target.cross_compiler,
                       progress=(lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None))
