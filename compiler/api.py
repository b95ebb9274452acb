"""`compile_model`: PyTorch MoE model -> artifact directory (manifest, libraries, expert files)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
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
    Workload,
    file_ref,
)
from moetvm.targets import DeployTarget, get_target

from . import frontend
from .lowering import build_library
from .spec import MoELayerSpec, UnsupportedModelError, find_moe_layers


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
            print(f"[{self.done}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f" {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "kv_layout") and callable(getattr(model, "step", None))


@contextmanager
def atomic_directory(out: Path):
    """Yield a temp dir beside `out`; on success it replaces `out` in one rename, on failure it
    is removed and whatever was at `out` stays untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "a")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compile_model(
    model: nn.Module,
    example_inputs: tuple = (),
    target: str | DeployTarget = "host",
    out: str | Path = "artifact",
    *,
    name: str | None = None,
    description: str = "",
    source: str | None = None,
    progress: bool = True,
) -> Path:
    """Compile a supported MoE model into an artifact directory and return its path.

    Supported: a causal LM following the KV-cached LM protocol (`step`, `kv_layout`; logits out),
    or a single MoE block taking hidden states (`example_inputs=(hidden,)`).
    """
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
    workloads = _group_workloads(specs)
    bar = Progress(progress, total=4 + len(workloads))
    out = Path(out)

    with bar.step(f"trace {type(model).__name__} with torch.export ({len(specs)} MoE layers)"):
        if lm:
            layers = model.kv_layout[0]
            input_names = ["tokens", "positions", "past_positions"] + [f"past_keys_{i}" for i in range(layers)] + [f"past_values_{i}" for i in range(layers)]
            output_names = ["logits"] + [f"keys_{i}" for i in range(layers)] + [f"values_{i}" for i in range(layers)]
            mod = frontend.export_causal_lm(model, specs)
        else:
            (example,) = example_inputs
            input_names, output_names = ["hidden"], ["output"]
            mod = frontend.export_moe_block(model, specs, example)
        split = frontend.split_at_moe_layers(mod, input_names, output_names)

    with atomic_directory(out) as tmp:
        (tmp / "lib").mkdir()
        libraries = []
        device_code: dict[str, dict] = {}

        def add_library(lib_name: str, module: tvm.IRModule):
            path = tmp / "lib" / f"{lib_name}.so"
            functions, device_info = build_library(module, dt, path)
            libraries.append(Library(name=lib_name, file=file_ref(tmp, path), functions=functions))
            if device_info:
                device_code[lib_name] = device_info

        with bar.step(f"build {len(split.segments.functions)} dense segments"):
            if len(split.segments.functions):
                add_library("segments", split.segments)

        with bar.step(f"build {len(specs)} routers"):
            routers = tvm.IRModule()
            for i, spec in enumerate(specs):
                routers[f"router_{i}"] = frontend.lower_router(spec, f"router_{i}")
                if spec.shared_gate_weight is not None:
                    routers[f"shared_gate_{i}"] = frontend.lower_shared_gate(spec, f"shared_gate_{i}")
            add_library("routers", routers)

        workload_entries = {}
        for key, (wid, example) in workloads.items():
            with bar.step(f"build expert workload {wid}"):
                fn = f"expert_{wid}"
                module = tvm.IRModule({fn: frontend.lower_expert_workload(example, fn)})
                add_library(fn, module)
                weights = frontend.kernel_weights(example)
                workload_entries[key] = Workload(
                    id=wid, kind=key[0], library=fn, function=fn, d_model=key[1], d_ff=key[2], dtype=key[3],
                    params=[TensorSpec(name=n, shape=list(w.shape), dtype=str(w.dtype)) for n, w in weights.items()],
                )

        with bar.step("write expert weights and manifest"):
            moe_layers = [_write_layer(tmp, i, spec, workload_entries) for i, spec in enumerate(specs)]
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                kind="causal_lm" if lm else "moe_block",
                model={**_model_info(model, name, description, specs), "source": source},
                target={"name": dt.name, "description": dt.description, "tvm_target": dt.tvm_target,
                        "host": dt.host, "device": dt.device, "memory_budget": dt.memory_budget},
                libraries=libraries,
                inputs=split.inputs,
                outputs=split.outputs,
                program=split.program,
                workloads=list(workload_entries.values()),
                moe_layers=moe_layers,
                compile_info={"tvm": tvm.__version__, "torch": torch.__version__, "seconds": round(bar.elapsed, 1),
                              **({"device_code": device_code} if device_code else {})},
            )
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return out


def _group_workloads(specs: list[MoELayerSpec]) -> dict[tuple, tuple[str, object]]:
    """Distinct expert workloads (kind, d_model, d_ff, dtype) -> (id, an example expert)."""
    found = {}
    for spec in specs:
        for e in spec.experts + spec.shared:
            key = frontend.workload_key(e)
            if key not in found:
                found[key] = (f"{key[0]}_{key[1]}x{key[2]}_{key[3]}", e)
    return found


def _write_layer(root: Path, index: int, spec: MoELayerSpec, workloads: dict) -> MoELayer:
    from safetensors.numpy import save_file

    folder = root / "experts" / f"layer{index}"
    folder.mkdir(parents=True)

    def write(expert, stem: str, number: int) -> Expert:
        weights = frontend.kernel_weights(expert)
        path = folder / f"{stem}.safetensors"
        save_file(weights, str(path))
        return Expert(index=number, workload=workloads[frontend.workload_key(expert)].id,
                      file=file_ref(root, path), weight_bytes=int(sum(w.nbytes for w in weights.values())))

    experts = [write(e, f"expert{j}", j) for j, e in enumerate(spec.experts)]
    shared = [
        SharedExpert(expert=write(e, f"shared{j}", j),
                     gate_function=f"shared_gate_{index}" if spec.shared_gate_weight is not None else None)
        for j, e in enumerate(spec.shared)
    ]
    router = Router(
        library="routers", function=f"router_{index}", n_experts=spec.n_experts, top_k=spec.top_k,
        score_fn=spec.score_fn, normalize=spec.normalize, n_groups=spec.n_groups, top_groups=spec.top_groups,
        scaling=float(spec.scaling),
        selection_bias=None if spec.selection_bias is None else [float(v) for v in np.asarray(spec.selection_bias)],
    )
    return MoELayer(layer=index, d_model=spec.d_model, router=router, experts=experts, shared=shared)


def _model_info(model: nn.Module, name: str | None, description: str, specs: list[MoELayerSpec]) -> dict:
    info = {
        "name": name or type(model).__name__,
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
