"""`compile_model`: PyTorch MoE model -> artifact directory (manifest, libraries, expert files)."""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
    TensorSpec,
    WeightFile,
    Workload,
    file_ref,
    plain_top_k,
    slot_layout,
)
from moetvm.budget import parse_budget
from moetvm.errors import UsageError
from moetvm.targets import DeployTarget, get_target

from . import frontend, quant_plan
from . import quant as quantization
from .attention import LANES as KV_CAPACITY_MULTIPLE
from .dense_weights import DenseWeights, store_dense_weights
from .gemv import dot_fits, lanes_for
from .lowering import build_library
from .output import atomic_directory, check_output
from moetvm.routing import ROUTING_MODES

from .spec import ExpertWeights, MoELayerSpec, UnsupportedModelError, find_moe_layers


class Progress:
    """One line per step with its duration, to stderr (compiles take minutes)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = time.perf_counter()

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total or '?'}] {what} ...", end="", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f" {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "kv_layout") and callable(getattr(model, "step", None))


def _in_lm_protocol(model: nn.Module) -> nn.Module:
    """A transformers causal LM (`*ForCausalLM`) is compiled through its LM-protocol wrapper."""
    if not _is_causal_lm(model) and type(model).__module__.startswith("transformers.") \
            and type(model).__name__.endswith("ForCausalLM"):
        from .hf import HFCausalLM

        return HFCausalLM(model)
    return model


def compile_model(
    model: nn.Module,
    example_inputs: tuple = (),
    target: str | DeployTarget = "host",
    out: str | Path = "artifact",
    *,
    quant: str = "fp32",
    group_size: int = quantization.DEFAULT_GROUP_SIZE,
    router_quant: str = "fp32",
    dense_quant: str | None = None,
    kv_dtype: str | None = None,
    weight_budget: int | str | None = None,
    calibration: np.ndarray | None = None,
    routing: str = "learned",
    tile: int = 16,
    cycle_dwell: int = 8,
    mask_below: float | None = None,
    tuning_db: str | Path | None = None,
    dense_fallback: bool = False,
    name: str | None = None,
    description: str = "",
    source: str | None = None,
    progress: bool = True,
    sign_key: str | Path | None = None,
) -> Path:
    """Compile a supported MoE model into an artifact directory and return its path.

    Supported: a causal LM following the KV-cached LM protocol (`step`, `kv_layout`; logits out),
    a transformers `*ForCausalLM` of a supported MoE family (wrapped in that protocol by
    compiler/hf.py), or a single MoE block taking hidden states (`example_inputs=(hidden,)`).

    quant: expert weight precision, one of fp32, fp16, int8, int4 (group-wise, `group_size`) or
    auto (per expert, from `calibration` token windows, within `weight_budget` bytes or a
    percentage of the fp32 expert bytes). router_quant: fp32 (default) or int8.
    dense_quant: precision of the dense part's linear layers, LM head and embedding table (fp32,
    fp16, int8, int4); default: the same as `quant` (fp32 with auto). Norms stay fp32, the
    routers take `router_quant`. The dense weights go to weight files, never into the library.
    kv_dtype: float32 or float16, the keys and values an LM caches (in place; see
    compiler/kv_cache.py); default float16 unless the dense part is fp32.
    calibration: token windows (batch, seq) run through the model to profile expert usage (stored
    per expert, it orders the runtime's preload) and, for auto, to plan precisions.
    routing: learned (the model's router), hash (token id -> experts, fitted on calibration so
    tokens keep the experts the router preferred for them), tiling (by position, `tile`
    positions per expert set) or cycle (by time step, each set held `cycle_dwell` steps).
    mask_below: experts taking less than this share of their layer's routing on the calibration
    text are masked (their traffic goes to each token's next-best expert) and pruned.
    tuning_db: a MetaSchedule database written by `tune_model`: kernels with records get their
    tuned schedules, the rest the default ones; the manifest says how many of each.
    dense_fallback: add per layer the mean of its experts, which the runtime's "dense" fallback
    policy uses in place of an expert that cannot be loaded (one more expert's bytes per layer).
    sign_key: an Ed25519 private key file; the artifact is signed before it replaces anything.

    Every option, the output path and the signing key are checked before any work starts; the
    new artifact is validated (manifest parsed, every file hashed, signature verified) before it
    replaces an old one at `out`, and `out` is replaced only when it holds a moetvm artifact.
    """
    check_compile_options(quant=quant, group_size=group_size, router_quant=router_quant, dense_quant=dense_quant,
                          kv_dtype=kv_dtype, weight_budget=weight_budget,
                          calibration=calibration, routing=routing, tile=tile, cycle_dwell=cycle_dwell,
                          mask_below=mask_below, tuning_db=tuning_db, sign_key=sign_key)
    check_output(out)
    bar = Progress(progress, total=0)  # _prepare sizes it once the workloads are known
    model = _in_lm_protocol(model)
    if not isinstance(model, nn.Module):
        raise UsageError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    if not _is_causal_lm(model):
        if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor):
            raise UsageError("a single MoE block needs example_inputs=(hidden,) with hidden a torch.Tensor "
                             f"(batch, seq, d_model); got {_describe(example_inputs)}")
    p = _prepare(model, example_inputs, target, quant=quant, group_size=group_size, router_quant=router_quant,
                 dense_quant=dense_quant, kv_dtype=kv_dtype,
                 weight_budget=weight_budget, calibration=calibration, routing=routing, tile=tile,
                 cycle_dwell=cycle_dwell, mask_below=mask_below, bar=bar)
    return write_artifact(p, out, _model_info(model, name, description, p.specs) | {"source": source},
                          tuning_db=tuning_db, dense_fallback=dense_fallback, bar=bar, sign_key=sign_key)


def _describe(values) -> str:
    return "(" + ", ".join(type(v).__name__ for v in values) + ")" if isinstance(values, tuple) else type(values).__name__


def check_compile_options(*, quant="fp32", group_size=quantization.DEFAULT_GROUP_SIZE, router_quant="fp32",
                          dense_quant=None, kv_dtype=None, weight_budget=None, calibration=None, routing="learned", tile=16, cycle_dwell=8,
                          mask_below=None, tuning_db=None, sign_key=None) -> None:
    """Refuse, before any work, every option that would fail later or build an unloadable
    artifact (UsageError, QuantizationError, TuningError or SignatureError, one line each)."""
    if quant != "auto":
        quantization.scheme(quant, group_size)
    elif weight_budget is None or calibration is None:
        raise quantization.QuantizationError("--quant auto needs calibration tokens and a --weight-budget")
    if not (isinstance(group_size, int) and group_size > 0):
        raise UsageError(f"group size must be a positive integer, got {group_size!r}")
    quantization.scheme(router_quant, group_size)
    if dense_quant is not None:
        quantization.scheme(dense_quant, group_size)
    if kv_dtype not in (None, *KV_DTYPES):
        raise UsageError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if weight_budget is not None:
        parse_budget(weight_budget, 1 << 40, "weight budget")
    if routing not in ROUTING_MODES:
        raise UsageError(f"unknown routing mode {routing!r}; choose from {', '.join(ROUTING_MODES)}")
    for flag, value in (("tile", tile), ("cycle dwell", cycle_dwell)):
        if not (isinstance(value, int) and value >= 1):
            raise UsageError(f"{flag} must be a positive number of positions, got {value!r}")
    if mask_below is not None and not (isinstance(mask_below, (int, float)) and 0 < mask_below < 1):
        raise UsageError(f"mask below must be a share of routing in (0, 1), got {mask_below!r}")
    if calibration is not None:
        cal = np.asarray(calibration)
        if cal.ndim != 2 or cal.size == 0 or not np.issubdtype(cal.dtype, np.integer):
            raise UsageError(f"calibration must be token windows (batch, seq) of integers with at least one token, "
                             f"got {cal.dtype} of shape {cal.shape}")
    if tuning_db is not None:
        from .tuning import open_database

        open_database(tuning_db, create=False)  # TuningError naming what is wrong with it
    if sign_key is not None:
        from moetvm.signing import load_private_key

        load_private_key(sign_key)


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


def write_artifact(p: "_Prepared", out: str | Path, model_info: dict, *, tuning_db=None, dense_fallback: bool = False,
                   bar: Progress | None = None, sign_key: str | Path | None = None) -> Path:
    """Build every library of a prepared model and write the artifact atomically (shared by the
    torch.export and ONNX front doors); signed with `sign_key` and validated before it replaces
    anything at `out`."""
    bar = bar or Progress(False, total=0)
    dt, specs = p.target, p.specs
    out = Path(out)

    with atomic_directory(out, validate=_validate_artifact(sign_key, bar)) as tmp:
        (tmp / "lib").mkdir()
        libraries = []
        device_code: dict[str, dict] = {}
        tuning = {"tuned": 0, "default": 0}

        for lib_name, module in _relax_libraries(p).items():
            what = {"segments": f"{sum(isinstance(f, tvm.relax.Function) for f in module.functions.values())} dense segments",
                    "routers": f"{len(specs)} routers ({p.routing}, {p.router_scheme.tag})"}.get(lib_name, f"expert workload {lib_name}")
            with bar.step(f"build {what}"):
                path = tmp / "lib" / f"{lib_name}.so"
                functions, info = build_library(module, dt, path, tuning_db=tuning_db)
                libraries.append(Library(name=lib_name, file=file_ref(tmp, path), functions=functions))
                if "tuning" in info:
                    stats = info.pop("tuning")
                    tuning = {k: tuning[k] + stats[k] for k in tuning}
                if info:
                    device_code[lib_name] = info

        with bar.step("write weights and manifest"):
            weights = _write_dense_weights(tmp, p.dense, p.split.weights) if p.dense else []
            moe_layers = [_write_layer(tmp, i, spec, p.plan, p.usage, p.workload_entries, p.routers[i], dense_fallback,
                                       p.resident.get(i)) for i, spec in enumerate(specs)]
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                kind=p.kind,
                model=model_info | ({"kv_cache": p.kv_cache} if p.kv_cache else {}),
                target={"name": dt.name, "description": dt.description, "tvm_target": dt.tvm_target,
                        "host": dt.host, "device": dt.device, "memory_budget": dt.memory_budget},
                libraries=libraries,
                inputs=p.split.inputs,
                outputs=p.split.outputs,
                program=p.split.program,
                workloads=list(p.workload_entries.values()),
                moe_layers=moe_layers,
                weights=weights,
                # No timestamps or durations: the same inputs give a byte-identical manifest.
                compile_info={"tvm": tvm.__version__, "torch": torch.__version__,
                              "quant": {**p.plan_info, "router": p.router_scheme.tag,
                                        **({"dense": p.dense.scheme.tag} if p.dense else {})},
                              **({"tuning": {**tuning, "database": str(tuning_db)}} if tuning_db else {}),
                              **({"device_code": device_code} if device_code else {})},
            )
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    if tuning_db and bar.enabled:
        print(f"tuning database {tuning_db}: {tuning['tuned']} kernels tuned, {tuning['default']} default", file=sys.stderr)
    return out


@dataclass
class _Prepared:
    """Everything decided before code is built: shared by compile and tune, so tuning sees
    exactly the kernels the compile will build."""

    target: DeployTarget
    specs: list
    lm: bool
    split: object
    plan: dict
    plan_info: dict
    usage: dict
    routers: list
    routing: str
    router_scheme: quantization.Scheme
    workload_entries: dict
    kind: str  # the artifact kind: causal_lm | moe_block | graph
    dense: DenseWeights | None = None  # the dense part's weights, which the segments take as inputs
    kv_cache: dict | None = None  # an LM's KV cache: layout, dtype (the manifest's model.kv_cache)
    resident: dict = dataclasses.field(default_factory=dict)  # layer -> its resident function
    resident_routing: dict = dataclasses.field(default_factory=dict)  # workload key -> [ResidentRouting]


KV_DTYPES = ("float32", "float16")


def dense_scheme(quant: str, dense_quant: str | None, group_size: int) -> quantization.Scheme:
    """The dense part's precision: `dense_quant`, else the experts' (`quant`; fp32 with auto)."""
    return quantization.scheme(dense_quant or (quant if quant != "auto" else "fp32"), group_size)


def _prepare(model, example_inputs, target, *, quant, group_size, router_quant, weight_budget, calibration,
             routing, tile, cycle_dwell, mask_below, bar: Progress, dense_quant: str | None = None,
             kv_dtype: str | None = None) -> _Prepared:
    dt = target if isinstance(target, DeployTarget) else get_target(target)
    dt.check_toolchain()
    model = model.eval()
    specs = find_moe_layers(model)
    if not specs:
        raise UnsupportedModelError(f"{type(model).__name__}: no MoE layer found")
    lm = _is_causal_lm(model)
    if not lm and not (len(specs) == 1 and specs[0].path == ""):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected a causal LM with step()/kv_layout or a single MoE block"
        )
    if routing not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {routing!r}; choose from {', '.join(ROUTING_MODES)}")
    if (routing == "hash" or mask_below is not None) and calibration is None:
        raise ValueError(f"routing {routing!r} / mask_below need calibration tokens to fit on")
    cal = quant_plan.calibrate(model, specs, calibration) if calibration is not None else None
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if routing == "hash" and (not lm or vocab is None):
        raise UnsupportedModelError("hash routing needs a language model with a known vocabulary (cfg.vocab_size)")
    p = plan_parts(specs, None, lm, dt, quant=quant, group_size=group_size, router_quant=router_quant,
                   weight_budget=weight_budget, calibration=calibration, cal=cal, routing=routing, tile=tile,
                   cycle_dwell=cycle_dwell, mask_below=mask_below, vocab=vocab, bar=bar)
    scheme = dense_scheme(quant, dense_quant, group_size)
    if lm:
        layout = "in_place" if getattr(model, "in_place_kv", False) else "concat"
        # fp16 keys and values (llama.cpp's default too) unless the model runs at fp32 throughout.
        kv_dtype = kv_dtype or ("float32" if scheme.name == "fp32" else "float16")
        p.kv_cache = {"layout": layout, "dtype": kv_dtype if layout == "in_place" else "float32"}
        if layout == "in_place":
            p.kv_cache["capacity_multiple"] = KV_CAPACITY_MULTIPLE
    kv_note = f", {p.kv_cache['layout']} {p.kv_cache['dtype']} KV cache" if lm else ""
    with bar.step(f"trace {type(model).__name__} with torch.export ({len(specs)} MoE layers{kv_note})"):
        if lm:
            input_names, output_names = frontend.lm_io_names(model.kv_layout[0], p.kv_cache["layout"])
            mod = frontend.export_causal_lm(model, specs, p.kv_cache["layout"], p.kv_cache["dtype"])
        else:
            (example,) = example_inputs
            input_names, output_names = ["hidden"], ["output"]
            mod = frontend.export_moe_block(model, specs, example)
    if lm:
        with bar.step(f"store the dense weights ({scheme.tag})"):
            mod, p.dense = store_dense_weights(mod, scheme, cpu=dt.cpu, int8_dot=dt.int8_dot)
    p.split = frontend.split_at_moe_layers(mod, input_names, output_names, p.dense.names if p.dense else [])
    return p


def plan_parts(specs: list[MoELayerSpec], split, lm: bool, target: DeployTarget, *, quant: str = "fp32",
               group_size: int = quantization.DEFAULT_GROUP_SIZE, router_quant: str = "fp32", weight_budget=None,
               calibration=None, cal=None, routing: str = "learned", tile: int = 16, cycle_dwell: int = 8,
               mask_below: float | None = None, vocab: int | None = None, bar: Progress | None = None,
               kind: str | None = None) -> _Prepared:
    """Decide precisions, routers and expert workloads for MoE layers `specs` of a model already
    cut into segments (`split`, a frontend.SplitProgram): whatever front door traced it.
    kind: the artifact kind (default causal_lm when `lm`, else moe_block)."""
    router_scheme = quantization.scheme(router_quant, group_size)
    plan, plan_info = _precision_plan(specs, cal, quant, group_size, weight_budget, calibration)
    if target.cpu:  # tiled storage for the CPU GEMV kernels, where a tile fits
        dims = {(li, ei): (e.d_ff, e.d_model) for li, spec in enumerate(specs)
                for ei, e in [*enumerate(spec.experts), *((("shared", j), e) for j, e in enumerate(spec.shared))]}
        dot = target.int8_dot
        lanes = {key: lanes_for(*dims[key]) for key in plan}
        plan = {key: sch.tiled(lanes[key], dot and bool(lanes[key]) and dot_fits(sch, *dims[key]))
                for key, sch in plan.items()}
    usage = _usage_profile(specs, cal)
    masked = _masked_experts(specs, usage, mask_below)
    routers = [_router_entry(i, spec, masked[i], routing, tile, cycle_dwell, calibration, cal, vocab)
               for i, spec in enumerate(specs)]
    workloads = _group_workloads(specs, plan)
    # Each workload also runs a token's k experts in one call, for the k of the layers using it.
    fused: dict[tuple, set] = {}
    for li, spec in enumerate(specs):
        for ei, e in enumerate(spec.experts):
            fused.setdefault((e.kind, e.d_model, e.d_ff, plan[(li, ei)]), set()).add(spec.top_k)
    resident_keys = _resident_layers(specs, plan, routers, target)
    entries, resident, resident_routing = {}, {}, {}
    for key, wid in workloads.items():
        expert_kind, d_model, d_ff, sch = key
        fn = f"expert_{wid}"
        params = [TensorSpec(name=n, shape=list(shape), dtype=dtype)
                  for n, shape, dtype in quantization.swiglu_params(d_model, d_ff, sch)]
        # One resident function per distinct routing among the layers of this workload.
        layer_routing = {li: _routing_signature(routers[li]) for li, wkey in resident_keys.items() if wkey == key}
        signatures = sorted(set(layer_routing.values()))
        names = {sig: f"{fn}_resident{j}" for j, sig in enumerate(signatures)}
        resident.update({li: names[sig] for li, sig in layer_routing.items()})
        resident_routing[key] = [quantization.ResidentRouting(names[sig], *sig) for sig in signatures]
        offsets, slot_bytes = slot_layout(params) if signatures else ([], 0)
        entries[key] = Workload(
            id=wid, kind=expert_kind, library=fn, function=fn, d_model=d_model, d_ff=d_ff, dtype="float32",
            quant=sch.name, group_size=sch.group_size, tile=sch.tile, dot=sch.dot, fused_k=sorted(fused.get(key, ())),
            params=params, slot_offsets=offsets, slot_bytes=slot_bytes)
    if bar is not None:
        bar.total = 5 + lm + len(entries)  # trace, dense weights, segments, routers, one per workload, write, validate
    return _Prepared(target, specs, lm, split, plan, plan_info, usage, routers, routing, router_scheme, entries,
                     kind or ("causal_lm" if lm else "moe_block"), resident=resident, resident_routing=resident_routing)


def _resident_layers(specs, plan: dict, routers: list[Router], target: DeployTarget) -> dict[int, tuple]:
    """Layer -> its experts' workload key, for the layers a resident function can run whole: CPU
    GEMV kernels (tiled storage), one workload for all experts, learned plain top-k routing, no
    masked or shared experts (the host path keeps the rest)."""
    out = {}
    for li, (spec, r) in enumerate(zip(specs, routers)):
        keys = {(e.kind, e.d_model, e.d_ff, plan[(li, ei)]) for ei, e in enumerate(spec.experts)}
        if target.cpu and len(keys) == 1 and next(iter(keys))[3].tile and plain_top_k(r) and not spec.shared:
            out[li] = next(iter(keys))
    return out


def _routing_signature(r: Router) -> tuple:
    return (r.n_experts, r.top_k, r.normalize, r.scaling)


def _relax_libraries(p: _Prepared) -> dict[str, tvm.IRModule]:
    """Library name -> the Relax module it is built from: segments, routers, one per workload."""
    libs = {}
    if any(isinstance(f, tvm.relax.Function) for f in p.split.segments.functions.values()):
        libs["segments"] = p.split.segments
    router_mod = tvm.IRModule()
    for i, spec in enumerate(p.specs):
        if p.routing == "learned":  # fixed patterns need no router at run time
            router_mod.update(quantization.router_module(spec.router_weight, spec.router_bias, spec.score_fn,
                                                         p.router_scheme, f"router_{i}"))
        if spec.shared_gate_weight is not None:
            router_mod.update(quantization.router_module(spec.shared_gate_weight, None, "sigmoid",
                                                         p.router_scheme, f"shared_gate_{i}"))
    if any(isinstance(f, tvm.relax.Function) for f in router_mod.functions.values()):
        libs["routers"] = router_mod
    for (kind, d_model, d_ff, sch), w in p.workload_entries.items():
        libs[w.library] = quantization.swiglu_module(
            d_model, d_ff, sch, w.function, tuple(w.fused_k), cpu=p.target.cpu,
            resident=tuple(p.resident_routing.get((kind, d_model, d_ff, sch), ())), slot=(w.slot_offsets, w.slot_bytes))
    return libs


def tune_model(model: nn.Module, example_inputs: tuple = (), target: str | DeployTarget = "host", *,
               db: str | Path, trials: int = 64, tracker: str | None = None, key: str | None = None,
               parts: tuple[str, ...] = ("segments", "routers", "experts"), progress: bool = True, **options):
    """Tune every distinct kernel the compile would build (same `options` as compile_model) with
    MetaSchedule + XGBoost into TVM's JSON database at `db`; resumable. Boards are measured
    through TVM's RPC tracker (`tracker="HOST:PORT"`, `key`). `parts` limits the libraries tuned
    (segments, routers, experts)."""
    from . import tuning
    from .lowering import tvm_target

    # The tracker first (rpc_runner checks it gives a device under the key): an unreachable one
    # is a TuningError now, not after preparing the model and failing every measurement.
    if tracker:
        deploy_target = target if isinstance(target, DeployTarget) else get_target(target)
        runner = tuning.rpc_runner(tracker, key or deploy_target.rpc_key)
    else:
        runner = None
    defaults = dict(quant="fp32", group_size=quantization.DEFAULT_GROUP_SIZE, router_quant="fp32", weight_budget=None,
                    calibration=None, routing="learned", tile=16, cycle_dwell=8, mask_below=None)
    p = _prepare(_in_lm_protocol(model), example_inputs, target, **{**defaults, **options}, bar=Progress(progress, total=4))
    tgt = tvm_target(p.target)
    libs = {k: v for k, v in _relax_libraries(p).items()
            if (k if k in ("segments", "routers") else "experts") in parts}
    # Segments carry batch, sequence and past length: tune them at the decode shape (all 1);
    # routers and experts also at a prefill bucket.
    tasks = tuning.extract_tasks({k: v for k, v in libs.items() if k == "segments"}, tgt, buckets=(1,))
    tasks += tuning.extract_tasks({k: v for k, v in libs.items() if k != "segments"}, tgt)
    return tuning.tune(tasks, tgt, Path(db), trials, runner=runner, cross_compiler=p.target.cross_compiler,
                       progress=(lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None))


def _usage_profile(specs, cal) -> dict:
    """(layer, expert) -> share of the layer's routing on the calibration tokens."""
    if cal is None:
        return {}
    usage = {}
    for li, (spec, c) in enumerate(zip(specs, cal)):
        counts = np.bincount(c.indices.ravel(), minlength=spec.n_experts)
        usage.update({(li, ei): float(n / counts.sum()) for ei, n in enumerate(counts)})
    return usage


def _precision_plan(specs, cal, quant, group_size, weight_budget, calibration):
    """(layer, expert) -> Scheme for every routed and shared expert, and a summary for the manifest."""
    keys = [(li, ei) for li, spec in enumerate(specs) for ei in range(len(spec.experts))]
    shared = {(li, ("shared", j)): quantization.scheme("fp32") for li, spec in enumerate(specs) for j in range(len(spec.shared))}
    if quant != "auto":
        s = quantization.scheme(quant, group_size)
        for spec in specs:
            for e in spec.experts + spec.shared:
                s.check(e.d_model)
                s.check(e.d_ff)
        return {**{k: s for k in keys}, **{k: s for k in shared}}, {"scheme": s.tag}
    if calibration is None or weight_budget is None:
        raise quantization.QuantizationError("--quant auto needs calibration tokens and a --weight-budget")
    fp32_bytes = sum(e.w_gate.nbytes * 3 for spec in specs for e in spec.experts)
    budget = parse_budget(weight_budget, fp32_bytes, "weight budget")
    chosen = quant_plan.plan(specs, cal, budget, group_size)
    counts = {}
    for s in chosen.values():
        counts[s.tag] = counts.get(s.tag, 0) + 1
    info = {"scheme": "auto", "weight_budget": budget, "calibration_tokens": int(np.asarray(calibration).size),
            "counts": counts, "experts": {f"{li}.{ei}": s.tag for (li, ei), s in chosen.items()}}
    return {**chosen, **shared}, info


def _group_workloads(specs: list[MoELayerSpec], plan: dict) -> dict[tuple, str]:
    """Distinct expert workloads (kind, d_model, d_ff, scheme) -> workload id."""
    found = {}
    for li, spec in enumerate(specs):
        for key, e in [((li, ei), e) for ei, e in enumerate(spec.experts)] + \
                      [((li, ("shared", j)), e) for j, e in enumerate(spec.shared)]:
            wkey = (e.kind, e.d_model, e.d_ff, plan[key])
            found.setdefault(wkey, f"{e.kind}_{e.d_model}x{e.d_ff}_{plan[key].tag}")
    return found


def _masked_experts(specs, usage: dict, mask_below: float | None) -> list[list[int]]:
    """Per layer, experts used less than `mask_below` of the layer's routing (never so many
    that fewer than top_k remain: the most used of them are kept)."""
    out = []
    for li, spec in enumerate(specs):
        if mask_below is None:
            out.append([])
            continue
        ranked = sorted(range(spec.n_experts), key=lambda e: usage[(li, e)], reverse=True)
        out.append(sorted(e for e in ranked[spec.top_k:] if usage[(li, e)] < mask_below))
    return out


def _router_entry(index, spec, masked, mode, tile, cycle_dwell, calibration, cal, vocab) -> Router:
    allowed = [e for e in range(spec.n_experts) if e not in masked]
    k = spec.top_k
    table = cycle = None
    if mode == "hash":  # each token keeps the allowed experts the learned router chose most for it
        tokens = np.asarray(calibration).ravel()
        counts = np.zeros((vocab, spec.n_experts))
        np.add.at(counts, (np.repeat(tokens, k), cal[index].indices.ravel()), 1)
        counts[:, masked] = -1
        table = []
        for t in range(vocab):
            if counts[t].max() > 0:
                table.append(sorted(int(e) for e in np.argsort(-counts[t], kind="stable")[:k]))
            else:  # unseen token: a balanced default
                table.append(sorted(allowed[(t * k + j) % len(allowed)] for j in range(k)))
    if mode == "cycle":
        sets = [sorted(allowed[(b * k + j) % len(allowed)] for j in range(k)) for b in range(-(-len(allowed) // k))]
        cycle = [s for s in sets for _ in range(cycle_dwell)]
    return spec.router(library="routers", function=f"router_{index}" if mode == "learned" else "",
                       mode=mode, table=table, tile=tile, cycle=cycle, masked=masked)


def _write_layer(root: Path, index: int, spec: MoELayerSpec, plan: dict, usage: dict, workloads: dict,
                 router: Router, dense_fallback: bool, resident_function: str | None = None) -> MoELayer:
    from safetensors.numpy import save_file

    folder = root / "experts" / f"layer{index}"
    folder.mkdir(parents=True)

    def write(expert, key, stem: str, number: int) -> Expert:
        sch = plan[key]
        tensors = quantization.quantize_expert(quantization.kernel_layout(expert.w_gate, expert.w_up, expert.w_down), sch)
        path = folder / f"{stem}.safetensors"
        save_file(tensors, str(path))
        workload = workloads[(expert.kind, expert.d_model, expert.d_ff, sch)]
        return Expert(index=number, workload=workload.id, file=file_ref(root, path),
                      weight_bytes=quantization.nbytes(tensors), usage=usage.get(key))

    experts = [write(e, (index, j), f"expert{j}", j) for j, e in enumerate(spec.experts) if j not in router.masked]
    # The "dense" fallback policy's stand-in: the mean of the layer's experts, at the precision
    # of its first expert (same workload, so no extra kernel).
    fallback = None
    if dense_fallback:
        mean = ExpertWeights(*(np.mean([getattr(e, w) for e in spec.experts], axis=0) for w in ("w_gate", "w_up", "w_down")),
                             kind=spec.experts[0].kind)
        fallback = dataclasses.replace(write(mean, (index, 0), "fallback", -1), usage=None)
    shared = [
        SharedExpert(expert=write(e, (index, ("shared", j)), f"shared{j}", j),
                     gate_function=f"shared_gate_{index}" if spec.shared_gate_weight is not None else None)
        for j, e in enumerate(spec.shared)
    ]
    return MoELayer(layer=index, d_model=spec.d_model, router=router, experts=experts, shared=shared, fallback=fallback,
                    resident_function=resident_function)


WEIGHT_SHARD_BYTES = 64 << 20  # per dense weight file: bounds what the runtime holds twice while loading


def _write_dense_weights(root: Path, dense: DenseWeights, specs: list[TensorSpec]) -> list[WeightFile]:
    """The dense weights as safetensors shards, in the order the model uses them."""
    from safetensors.numpy import save_file

    folder = root / "weights"
    folder.mkdir()
    shards: list[list[int]] = [[]]
    size = 0
    for i, array in enumerate(dense.arrays):
        if shards[-1] and size + array.nbytes > WEIGHT_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += array.nbytes
    files = []
    for n, shard in enumerate(s for s in shards if s):
        path = folder / f"dense-{n:05d}.safetensors"
        save_file({dense.names[i]: dense.arrays[i] for i in shard}, str(path))
        files.append(WeightFile(file=file_ref(root, path), tensors=[specs[i] for i in shard],
                                weight_bytes=int(sum(dense.arrays[i].nbytes for i in shard)), quant=dense.scheme.tag))
    return files


def _model_info(model: nn.Module, name: str | None, description: str, specs: list[MoELayerSpec]) -> dict:
    info = {
        "name": name or type(getattr(model, "hf", model)).__name__,
        "description": description,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "moe_layers": len(specs),
        "experts_per_layer": [s.n_experts for s in specs],
        "top_k": [s.top_k for s in specs],
    }
    if _is_causal_lm(model):
        info["kv_layout"] = list(model.kv_layout)
        cfg = getattr(model, "cfg", None)
        for key in ("vocab_size", "max_positions", "d_model"):
            if hasattr(cfg, key):
                info[key] = getattr(cfg, key)
    return info
