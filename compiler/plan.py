"""Planning, the back end's first half, shared by both front doors: for MoE layers found in a
model already cut into segments, decide each expert's precision and storage, the routers, the
distinct expert workloads and the resident layers. The result, a PlannedModel, is what
writer.py builds and writes, and what tuning extracts its tasks from, so the kernels tuned are
the kernels compiled."""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from moetvm.artifact import DecodeStep, ModelInfo, Router, TensorSpec, Workload, plain_top_k, slot_layout
from moetvm.budget import parse_budget

from . import quant as quantization
from . import quant_plan
from .quant_kernels import DecodeLayer, ResidentRouting
from .decode_step import plan_decode_step
from .dense_weights import DenseWeights
from .gemv import dot_fits, fuses_resident_layer, lanes_for
from .build_target import BuildTarget
from .options import CompileOptions
from .spec import MoELayerSpec


class Progress:
    """One line per step with its duration, to stderr (compiles take minutes)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = time.perf_counter()
        self._line, self._shown = "", 0.0

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        self.done += 1
        self._line = f"[{self.done}/{self.total or '?'}] {what} ..."
        if self.enabled:
            print(self._line, end="", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f" {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    def count(self, what: str, done: int, total: int, made: int, since: float, note: str = "") -> None:
        """A running count within the current step (at most a line a second): done / total, and
        an ETA from the rate of the `made` ones (the rest were reused) since `since`; `note`
        follows."""
        now = time.perf_counter()
        if not self.enabled or (done < total and now - self._shown < 1.0):
            return
        self._shown = now
        rate = made / max(now - since, 1e-9)
        eta = f", ETA {(total - done) / rate:.0f}s" if made and done < total else ""
        reused = f" ({done - made} reused)" if done > made else ""
        print(f"\r{self._line} {what} {done}/{total}{reused}{note}{eta}", end="", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class PlannedModel:
    """Everything decided before code is built: shared by compile and tune, so tuning sees
    exactly the kernels the compile will build."""

    target: BuildTarget
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
    resident: dict = dataclasses.field(default_factory=dict)  # layer -> its resident function
    resident_routing: dict = dataclasses.field(default_factory=dict)  # workload key -> [ResidentRouting]
    decode: dict = dataclasses.field(default_factory=dict)  # layer -> its DecodeLayer (router library)
    decode_step: DecodeStep | None = None  # a decode step in one call (the routers then live in the segments library)
    model_info: ModelInfo = dataclasses.field(default_factory=ModelInfo)  # the manifest's model section (the front door's)
    tokenizer: object = None  # a causal LM's tokenizer.TokenizerSource, copied into the artifact

    def cut(self, split, bar: Progress | None = None) -> None:
        """Take the segments the front door cut (a frontend.SplitProgram), and the decode step
        they allow: its routers and decode functions then go beside the segments it calls."""
        self.split = split
        self.decode_step = plan_decode_step(split, set(self.decode), self.lm)
        if self.decode_step is not None:
            self.routers = [dataclasses.replace(r, library="segments") for r in self.routers]
            if bar is not None:
                bar.total -= 1  # no router library of its own


def plan_parts(specs: list[MoELayerSpec], split, lm: bool, target: BuildTarget, options: CompileOptions, *,
               calibration=None, cal=None, vocab: int | None = None, bar: Progress | None = None,
               kind: str | None = None) -> PlannedModel:
    """Decide precisions, routers and expert workloads for MoE layers `specs` of a model already
    cut into segments (`split`, a frontend.SplitProgram): whatever front door traced it.
    kind: the artifact kind (default causal_lm when `lm`, else moe_block)."""
    router_scheme = quantization.scheme(options.router_quant, options.group_size)
    plan, plan_info = _precision_plan(specs, cal, options, calibration)
    if target.cpu:  # tiled storage for the CPU GEMV kernels, where a tile fits
        dims = {(li, ei): (e.d_ff, e.d_model) for li, spec in enumerate(specs)
                for ei, e in [*enumerate(spec.experts), *((("shared", j), e) for j, e in enumerate(spec.shared))]}
        lanes = {key: lanes_for(*dims[key]) for key in plan}
        plan = {key: sch.tiled(lanes[key], target.dot_for(sch.name) and bool(lanes[key]) and dot_fits(sch, *dims[key]),
                               vnni=target.int8_dot)
                for key, sch in plan.items()}
    usage = _usage_profile(specs, cal)
    masked = _masked_experts(specs, usage, options.mask_below)
    routers = [_router_entry(i, spec, masked[i], options.routing, options.tile, options.cycle_dwell, calibration, cal, vocab)
               for i, spec in enumerate(specs)]
    workloads = _group_workloads(specs, plan)
    # Each workload also runs a token's k experts in one call, for the k of the layers using it.
    fused: dict[tuple, set] = {}
    for li, spec in enumerate(specs):
        for ei, e in enumerate(spec.experts):
            fused.setdefault((e.kind, e.d_model, e.d_ff, plan[(li, ei)]), set()).add(spec.top_k)
    resident_keys = _resident_layers(specs, plan, routers, target)
    entries, resident, resident_routing, decode = {}, {}, {}, {}
    for key, wid in workloads.items():
        expert_kind, d_model, d_ff, sch = key
        fn = f"expert_{wid}"
        params = [TensorSpec(name=n, shape=list(shape), dtype=dtype)
                  for n, shape, dtype in quantization.expert_params(d_model, d_ff, sch, expert_kind)]
        # One resident function per distinct routing among the layers of this workload.
        layer_routing = {li: _routing_signature(routers[li]) for li, wkey in resident_keys.items() if wkey == key}
        signatures = sorted(set(layer_routing.values()))
        names = {sig: f"{fn}_resident{j}" for j, sig in enumerate(signatures)}
        resident.update({li: names[sig] for li, sig in layer_routing.items()})
        resident_routing[key] = [ResidentRouting(names[sig], *sig) for sig in signatures]
        offsets, slot_bytes = slot_layout(params) if signatures else ([], 0)
        # Where the resident layer is one kernel, the router library also runs router and layer in one call.
        if fuses_resident_layer(sch):
            decode.update({li: DecodeLayer(f"router_{li}_decode", f"router_{li}", d_model, d_ff, sch,
                                           ResidentRouting(names[sig], *sig), (offsets, slot_bytes))
                           for li, sig in layer_routing.items()})
        entries[key] = Workload(
            id=wid, kind=expert_kind, library=fn, function=fn, d_model=d_model, d_ff=d_ff, dtype="float32",
            quant=sch.name, group_size=sch.group_size, symmetric=sch.symmetric, tile=sch.tile, dot=sch.dot,
            fused_k=sorted(fused.get(key, ())),
            params=params, slot_offsets=offsets, slot_bytes=slot_bytes)
    if bar is not None:
        bar.total = 5 + lm + len(entries)  # trace, dense weights, segments, routers, one per workload, write, validate
    p = PlannedModel(target, specs, lm, split, plan, plan_info, usage, routers, options.routing, router_scheme, entries,
                     kind or ("causal_lm" if lm else "moe_block"), resident=resident, resident_routing=resident_routing,
                     decode=decode)
    if split is not None:
        p.cut(split, bar)
    return p


def _resident_layers(specs, plan: dict, routers: list[Router], target: BuildTarget) -> dict[int, tuple]:
    """Layer -> its experts' workload key, for the layers a resident function can run whole: CPU
    GEMV kernels (tiled storage), one workload of SwiGLU experts, learned plain top-k routing, no
    masked or shared experts (the host path keeps the rest)."""
    out = {}
    for li, (spec, r) in enumerate(zip(specs, routers)):
        keys = {(e.kind, e.d_model, e.d_ff, plan[(li, ei)]) for ei, e in enumerate(spec.experts)}
        if target.cpu and len(keys) == 1 and next(iter(keys))[3].tile and plain_top_k(r) and not spec.shared \
                and next(iter(keys))[0] == quantization.SWIGLU:
            out[li] = next(iter(keys))
    return out


def _routing_signature(r: Router) -> tuple:
    return (r.n_experts, r.top_k, r.normalize, r.scaling)


def _usage_profile(specs, cal) -> dict:
    """(layer, expert) -> share of the layer's routing on the calibration tokens."""
    if cal is None:
        return {}
    usage = {}
    for li, (spec, c) in enumerate(zip(specs, cal)):
        counts = np.bincount(c.indices.ravel(), minlength=spec.n_experts)
        usage.update({(li, ei): float(n / counts.sum()) for ei, n in enumerate(counts)})
    return usage


def _precision_plan(specs, cal, options: CompileOptions, calibration):
    """(layer, expert) -> Scheme for every routed and shared expert, and a summary for the manifest."""
    keys = [(li, ei) for li, spec in enumerate(specs) for ei in range(len(spec.experts))]
    shared = {(li, ("shared", j)): quantization.scheme("fp32") for li, spec in enumerate(specs) for j in range(len(spec.shared))}
    if options.quant != "auto":
        s = quantization.scheme(options.quant, options.group_size, options.int4_symmetric)
        for spec in specs:
            for e in spec.experts + spec.shared:
                s.check(e.d_model)
                s.check(e.d_ff)
        return {**{k: s for k in keys}, **{k: s for k in shared}}, {"scheme": s.tag}
    if calibration is None or options.weight_budget is None:
        raise quantization.QuantizationError("--quant auto needs calibration tokens and a --weight-budget")
    fp32_bytes = sum(e.d_model * e.d_ff * 4 * len(quantization.projections(e.kind)) for spec in specs for e in spec.experts)
    budget = parse_budget(options.weight_budget, fp32_bytes, "weight budget")
    chosen = quant_plan.plan(specs, cal, budget, options.group_size, options.int4_symmetric)
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
