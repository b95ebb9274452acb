"""The back end's second half: a PlannedModel -> an artifact directory. Builds every library
(segments, routers, one per expert workload) for the plan's target, writes expert and dense
weight files and the manifest, and replaces the output only once the new artifact validates."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tvm
from moetvm.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Expert,
    Library,
    Manifest,
    MoELayer,
    Router,
    SharedExpert,
    TargetInfo,
    TensorSpec,
    WeightFile,
    file_ref,
)

from . import quant as quantization
from .decode_step import add_decode_step
from .quant_kernels import router_module, expert_module
from .dense_weights import DenseWeights
from .lowering import build_library
from .options import CompileOptions
from moetvm.output import atomic_directory
from .plan import PlannedModel, Progress
from .quantized import QuantizedNumbers, expert_tensors, identity, remove_store, save_tensors, store_name
from .spec import ExpertWeights, MoELayerSpec
from .tuning import apply_database


def _validate_artifact(sign_key, bar: Progress):
    """The last check before a new artifact replaces anything: its manifest parses, every file
    matches its recorded size and hash, and (when signing) the signature verifies."""
    def validate(root: Path) -> None:
        from moetvm.artifact import check_file, read_manifest

        with bar.step("validate" + (" and sign" if sign_key else "") + " the new artifact"):
            manifest = read_manifest(root)
            for ref in manifest.files():
                check_file(root, ref)
            if sign_key is not None:
                from moetvm.signing import sign_artifact, verify_signed_by

                sign_artifact(root, sign_key, check_files=False)
                verify_signed_by(root, sign_key)
    return validate


def write_artifact(p: PlannedModel, out: str | Path, options: CompileOptions, bar: Progress | None = None,
                   quantized: QuantizedNumbers | None = None) -> Path:
    """Build every library of a prepared model and write the artifact atomically (shared by the
    torch.export and ONNX front doors); signed with the options' key and validated before it
    replaces anything at `out`. `quantized`: where the weights' quantized numbers are kept for
    the other targets of the same compile (api.compile_targets)."""
    bar = bar or Progress(False, total=0)
    dt, specs = p.target.deploy, p.specs
    tuning_db, sign_key = options.tuning_db, options.sign_key
    out = Path(out)

    with atomic_directory(out, validate=_validate_artifact(sign_key, bar)) as tmp:
        (tmp / "lib").mkdir()
        libraries = []
        device_code: dict[str, dict] = {}
        tuning = {"tuned": 0, "default": 0}

        segments = sum(step.op == "segment" for step in p.split.program)
        for lib_name, module in relax_libraries(p).items():
            what = {"segments": f"{segments} dense segments" + (", routers, decode step" if p.decode_step else ""),
                    "routers": f"{len(specs)} routers ({p.routing}, {p.router_scheme.tag})"}.get(lib_name, f"expert workload {lib_name}")
            with bar.step(f"build {what}"):
                path = tmp / "lib" / f"{lib_name}.so"
                # One database pass per library: its stats count that library's kernels.
                tuned = apply_database(tuning_db, p.target.tvm) if tuning_db is not None else None
                functions, info = build_library(module, p.target, path, tuned)
                libraries.append(Library(name=lib_name, file=file_ref(tmp, path), functions=functions))
                if "tuning" in info:
                    stats = info.pop("tuning")
                    tuning = {k: tuning[k] + stats[k] for k in tuning}
                if info:
                    device_code[lib_name] = info

        with bar.step("write weights and manifest"):
            quantized = quantized or QuantizedNumbers(None)
            weights = _write_dense_weights(tmp, p.dense, p.split.weights, quantized) if p.dense else []
            total = sum(len(spec.experts) - len(p.routers[i].masked) + len(spec.shared) + options.dense_fallback
                        for i, spec in enumerate(specs))
            files = ExpertFiles(out, total, bar, quantized)
            moe_layers = [_write_layer(tmp, i, spec, p.plan, p.usage, p.workload_entries, p.routers[i], options.dense_fallback,
                                       files, p.resident.get(i), p.decode[i].function if i in p.decode else None)
                          for i, spec in enumerate(specs)]
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                kind=p.kind,
                model=p.model_info,
                # The deploy target's facts a board needs: deploy takes the tracker key from here.
                target=TargetInfo(name=dt.name, tvm_target=dt.tvm_target, description=dt.description, host=dt.host,
                                  device=dt.device, memory_budget=dt.memory_budget, rpc_key=dt.rpc_key),
                libraries=libraries,
                inputs=p.split.inputs,
                outputs=p.split.outputs,
                program=p.split.program,
                workloads=list(p.workload_entries.values()),
                moe_layers=moe_layers,
                weights=weights,
                decode_step=p.decode_step,
                tokenizer=p.tokenizer.write(tmp) if p.tokenizer is not None else None,
                # No timestamps or durations: the same inputs give a byte-identical manifest.
                compile_info={"tvm": tvm.__version__, "torch": torch.__version__,
                              "quant": {**p.plan_info, "router": p.router_scheme.tag,
                                        **({"dense": p.dense.scheme.tag} if p.dense else {})},
                              **({"tuning": {**tuning, "database": str(tuning_db)}} if tuning_db else {}),
                              **({"device_code": device_code} if device_code else {})},
            )
            if options.encrypt_key is not None:
                from moetvm.encryption import WeightCipher, encrypt_weights, read_key

                manifest = encrypt_weights(tmp, manifest, WeightCipher(read_key(options.encrypt_key), dt.weight_aead))
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    files.finish()
    if tuning_db and bar.enabled:
        print(f"tuning database {tuning_db}: {tuning['tuned']} kernels tuned, {tuning['default']} default", file=sys.stderr)
    return out


def relax_libraries(p: PlannedModel, decode_step: bool = True) -> dict[str, tvm.IRModule]:
    """Library name -> the Relax module it is built from: segments, routers, one per workload;
    with the plan's decode step, the routers and the step in the segments' library (tuning asks
    for them apart, `decode_step=False`: the step's kernels are theirs)."""
    libs = {}
    if any(isinstance(f, tvm.relax.Function) for f in p.split.segments.functions.values()):
        libs["segments"] = p.split.segments
    routers = []
    for i, spec in enumerate(p.specs):
        if p.routing == "learned":  # fixed patterns need no router at run time
            routers.append((f"router_{i}", spec.router_weight, spec.router_bias, spec.score_fn))
        if spec.shared_gate_weight is not None:
            routers.append((f"shared_gate_{i}", spec.shared_gate_weight, None, "sigmoid"))
    if routers and p.decode_step is not None and decode_step:  # one library: the decode step calls segments and routers alike
        module = router_module(routers, p.router_scheme, cpu=p.target.cpu, decode=tuple(p.decode.values()),
                               base=p.split.segments)
        libs["segments"] = add_decode_step(module, p.split, p.decode_step,
                                           {li: layer.function for li, layer in p.decode.items()})
    elif routers:
        libs["routers"] = router_module(routers, p.router_scheme, cpu=p.target.cpu, decode=tuple(p.decode.values()))
    for (kind, d_model, d_ff, sch), w in p.workload_entries.items():
        libs[w.library] = expert_module(
            d_model, d_ff, sch, w.function, tuple(w.fused_k), cpu=p.target.cpu, kind=kind,
            resident=tuple(p.resident_routing.get((kind, d_model, d_ff, sch), ())), slot=(w.slot_offsets, w.slot_bytes))
    return libs


class ExpertFiles:
    """Writes the experts' weight files so that an interrupted compile resumes. Each expert's
    stored tensors go first to a store beside the output (`.NAME.partial/`), under a key of all
    they are made from (the source tensors: a checkpoint's by file, size, time and key, others by
    their bytes; precision and layout; the quantizer's code), then are linked into the artifact.
    A compile stopped by anything (Ctrl-C, a kill, a power cut) leaves the store, and the next
    compile to the same output links the experts it finds there instead of making them again;
    the store goes once the artifact is in place."""

    def __init__(self, out: Path, total: int, bar: Progress, quantized: QuantizedNumbers):
        self.store = out.parent / f".{out.name}.partial"
        self.total, self.bar, self.quantized = total, bar, quantized
        self.done = self.made = 0
        self.shared_before = quantized.shared
        self.started = time.perf_counter()

    def write(self, expert: ExpertWeights, scheme: quantization.Scheme, path: Path) -> int:
        """Expert's file at `path`; returns its weight bytes."""
        kept = self.store / f"{expert_key(expert, scheme.tag)}.safetensors"
        if not kept.is_file():
            self.store.mkdir(exist_ok=True)
            save_tensors(quantization.relayout_expert(self.quantized.expert(expert, scheme), scheme), kept)
            self.made += 1
        try:
            os.link(kept, path)
        except OSError:  # a file system without hard links
            shutil.copyfile(kept, path)
        self.done += 1
        shared = self.quantized.shared - self.shared_before
        self.bar.count("experts", self.done, self.total, self.made, self.started,
                       f" ({shared} quantized for an earlier target)" if shared else "")
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for _, shape, dtype in quantization.expert_params(expert.d_model, expert.d_ff, scheme, expert.kind))

    def finish(self) -> None:
        """The artifact is in place: the store has served (it holds only our files)."""
        remove_store(self.store)


def expert_key(expert: ExpertWeights, tag: str) -> str:
    """A name for an expert's stored tensors at `tag` from all they are made of: the source
    tensors, the precision and layout, and the quantizer's code."""
    return store_name([tag, expert.kind, *map(identity, expert_tensors(expert))])


def _write_layer(root: Path, index: int, spec: MoELayerSpec, plan: dict, usage: dict, workloads: dict,
                 router: Router, dense_fallback: bool, files: ExpertFiles, resident_function: str | None = None,
                 decode_function: str | None = None) -> MoELayer:
    folder = root / "experts" / f"layer{index}"
    folder.mkdir(parents=True)

    def write(expert, key, stem: str, number: int) -> Expert:
        sch = plan[key]
        path = folder / f"{stem}.safetensors"
        weight_bytes = files.write(expert, sch, path)
        workload = workloads[(expert.kind, expert.d_model, expert.d_ff, sch)]
        return Expert(index=number, workload=workload.id, file=file_ref(root, path), weight_bytes=weight_bytes,
                      usage=usage.get(key))

    experts = [write(e, (index, j), f"expert{j}", j) for j, e in enumerate(spec.experts) if j not in router.masked]
    # The "dense" fallback policy's stand-in: the mean of the layer's experts, at the precision
    # of its first expert (same workload, so no extra kernel).
    fallback = None
    if dense_fallback:
        # summed one expert at a time: a streamed layer's experts are never all in memory
        average = lambda tensors: sum(np.asarray(t, np.float64) for t in tensors) / len(spec.experts)  # noqa: E731
        first = spec.experts[0]
        mean = ExpertWeights(*(None if getattr(first, w) is None else average(getattr(e, w) for e in spec.experts)
                               for w in ("w_gate", "w_up", "w_down")),
                             kind=first.kind,
                             biases=None if first.biases is None else
                             tuple(average(e.biases[i] for e in spec.experts) for i in range(len(first.biases))))
        fallback = dataclasses.replace(write(mean, (index, 0), "fallback", -1), usage=None)
    shared = [
        SharedExpert(expert=write(e, (index, ("shared", j)), f"shared{j}", j),
                     gate_function=f"shared_gate_{index}" if spec.shared_gate_weight is not None else None)
        for j, e in enumerate(spec.shared)
    ]
    return MoELayer(layer=index, d_model=spec.d_model, router=router, experts=experts, shared=shared, fallback=fallback,
                    resident_function=resident_function, decode_function=decode_function)


WEIGHT_SHARD_BYTES = 64 << 20  # per dense weight file: bounds what the runtime holds twice while loading


def _write_dense_weights(root: Path, dense: DenseWeights, specs: list[TensorSpec],
                         quantized: QuantizedNumbers) -> list[WeightFile]:
    """The dense weights as safetensors shards, in the order the model uses them."""
    from safetensors.numpy import save_file

    folder = root / "weights"
    folder.mkdir()
    shards: list[list[int]] = [[]]
    size = 0
    for i in range(len(dense.names)):
        if shards[-1] and size + dense.nbytes_of(i) > WEIGHT_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += dense.nbytes_of(i)
    files = []
    tensors = dense.tensors(quantized)  # made one weight at a time: a shard is the most held at once
    for n, shard in enumerate(s for s in shards if s):
        path = folder / f"dense-{n:05d}.safetensors"
        arrays = dict(next(tensors) for _ in shard)
        save_file(arrays, str(path))
        shard_specs = [dataclasses.replace(specs[i], lookup_rows=dense.lookup_rows.get(specs[i].name)) for i in shard]
        files.append(WeightFile(file=file_ref(root, path), tensors=shard_specs,
                                weight_bytes=int(sum(a.nbytes for a in arrays.values())), quant=dense.scheme.tag))
        del arrays
    return files
