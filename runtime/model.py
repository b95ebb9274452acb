"""Load an artifact and run it: dense segments, and per MoE layer route -> fetch -> run -> fuse."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import platform
import resource
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from moetvm.errors import MoetvmError
from moetvm.artifact import (FIXED_MODES, ArtifactError, Expert, Manifest, MoELayer, check_file, copy_verified,
                             fused_function, read_manifest, read_verified)
from moetvm.encryption import EncryptionError, WeightCipher, key_from

from .cache import AdaptiveBudget, ExpertCache, LayerUse, SlowStorage, hot_set_bytes, parse_budget
from .generation import Generation, GenerationError, Sampler, Sampling, Token
from .tokenizer import Tokenizer, load_tokenizer
from . import tvm_runtime
from .host_memory import ALIGN, aligned_copy, aligned_empty, host_arrays, release_freed_memory, settle
from .lookup_table import LookupTable
from .weight_files import as_tensor, read_weight_file, tensors_of
from moetvm.routing import SKIPPED, FixedPattern, allowed_experts, group_by_expert, route, skip_light_experts


LATENCY_WINDOW = 10_000  # decode latencies kept for the percentiles in stats()
TRIM_EVERY_LOADS = 16  # expert loads between trims of malloc's free memory (host_memory.release_freed_memory)
# Prompt tokens per prefill step of a generation (llama.cpp's ubatch): a step's activations, attention
# scores and logits grow with its tokens. A 1024-token prompt in one step took the int4 GraniteMoE
# process 1,145 MB above its loaded size and 9.2 s (2 threads); in steps of 128, 232 MB and 7.0 s
# (64: 137 MB, 6.8 s; 256: 366 MB, 7.5 s); the OLMoE-style one 728 MB and 8.1 s, then 249 MB and 3.6 s.
PREFILL_CHUNK = 128


class InputError(MoetvmError, ValueError):
    """Inputs that do not fit the artifact (shape, dtype, range)."""


@dataclass
class Timings:
    """Where the time goes, summed over calls (seconds)."""

    segments: float = 0.0
    routing: float = 0.0  # this layer's router and top-k (or pattern lookup)
    lookahead: float = 0.0  # predicting and requesting the next layer's experts, trace recording
    experts: float = 0.0
    expert_loads: float = 0.0
    calls: float = 0.0  # inside compiled functions (kernels and the VM that sequences them)
    call_count: int = 0
    steps: float = 0.0  # whole forward steps (prefills and decode tokens)
    decode_steps: float = 0.0  # decode steps run as one call (artifact.DecodeStep): segments, routers and experts
    # The latest decode steps and prefills (bounded: a board runs for days); counts are kept apart.
    token_latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    prefill: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    decode_tokens: int = 0
    decode_seconds: float = 0.0  # generate's decode steps...
    decode_calls: float = 0.0  # ...and the part of them inside compiled functions


def load_model(path: str | Path, cache_budget: int | float | str = "100%", verify: bool = True, *,
               prefetch: bool = False, preload: float | str = "auto", storage_mbps: float | None = None,
               fallback: str = "error", trusted_keys: list | None = None,
               decrypt_key: str | Path | bytes | None = None, min_expert_weight: float = 0.0,
               expert_source: str | None = None, expert_store: str | Path | None = None,
               expert_store_budget: int | float | str = "100%") -> "MoEModel":
    """Validate and load the artifact at `path`.

    cache_budget: bytes of expert weights kept loaded (int), a fraction (float), "25%", or a
    size ("64MB"); or "FLOOR..CEILING" ("25%..60%"): a budget that grows by the hit rate and
    shrinks when memory runs short, never past the ceiling (cache.AdaptiveBudget). Every file's size and SHA-256 is checked before any library is loaded.
    prefetch: a background thread loads each next layer's predicted experts (the next router
    applied to this layer's input) while this layer computes. Off by default: on a CPU it was
    slower in every configuration measured (exact predictions, slow storage and real reads under
    a memory cap included: docs/decode-history.md). The loads it would overlap cost the same
    cores and storage the demand needs, and a token's compute hides less than its wrong
    predictions cost; a layer's misses already load on two threads.
    preload: fraction of the experts, hottest first by the artifact's usage profile, loaded and
    pinned at start (within the budget); "auto" (default): every expert when the budget holds
    them all and the artifact has resident layers (decode then routes and runs each such layer
    in one call), else the hottest experts that fit in `cache.hot_set_bytes` of the budget (none
    without a usage profile): what leaves the rest room for a token's experts, at most half.
    storage_mbps: throttle expert reads to this many MB/s, one read at a time across threads (to
    study slow storage such as an SD card: cache.SlowStorage).
    fallback: when an expert cannot be loaded at run time (I/O error, vanished or altered file):
    "error" (default: raise, never a silently wrong result), "skip" (renormalise each token over
    its remaining experts) or "dense" (the layer's compiled fallback expert stands in). Each
    fallback is counted in stats().
    trusted_keys: Ed25519 public key files; the artifact's signature must verify with one of them
    before anything else is read.
    decrypt_key: for an artifact whose weights are encrypted (compile --encrypt-key): the key file
    or its 32 bytes (default: the file named by MOETVM_DECRYPT_KEY). Checked before any library
    is loaded; weights are decrypted in memory only.
    expert_source: an http(s) URL serving the artifact's files (`moetvm serve-experts DIR`): expert
    files missing here are fetched when first needed, verified against the manifest, and kept in
    `expert_store` (default ~/.cache/moetvm/experts) within `expert_store_budget` (bytes, a size or
    a percentage of all expert files; runtime/expert_store.py).
    min_expert_weight: confidence-based skipping: a token does not run the selected experts whose
    share of its routing weight is below this (its heaviest always runs; the rest renormalised,
    routing.skip_light_experts). 0 (default): every selected expert runs. Decode then takes the
    host path, which can drop experts, instead of the resident layers.
    """
    root = Path(path)
    if fallback not in ("error", "skip", "dense"):
        raise InputError(f"unknown fallback policy {fallback!r}: use error, skip or dense")
    if preload != "auto" and (isinstance(preload, bool) or not isinstance(preload, (int, float)) or not 0 <= preload <= 1):
        raise InputError(f"preload is a fraction of the experts in [0, 1] or 'auto', got {preload!r}")
    if isinstance(min_expert_weight, bool) or not isinstance(min_expert_weight, (int, float)) \
            or not 0 <= min_expert_weight < 1:
        raise InputError(f"min expert weight is a share of a token's routing weight in [0, 1), got {min_expert_weight!r}")
    if storage_mbps is not None and not (isinstance(storage_mbps, (int, float)) and 0 < storage_mbps < float("inf")):
        raise InputError(f"storage throttle must be a positive number of MB/s, got {storage_mbps!r}")
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if trusted_keys is not None:  # the signature is checked first, on the very bytes parsed
        from moetvm.signing import read_verified_manifest

        manifest, _ = read_verified_manifest(root, trusted_keys)
    else:
        manifest = read_manifest(root)
    key = key_from(decrypt_key)
    if decrypt_key is not None and manifest.encryption is None:
        raise EncryptionError(f"{root}: the weights are not encrypted; a decrypt key was given for an encrypted artifact")
    cipher = WeightCipher.for_artifact(manifest.encryption, key, str(root))
    store = None
    if expert_source is not None:
        from .expert_store import ExpertStore

        files = sum(ref.size for ref in manifest.weight_files()) - sum(w.file.size for w in manifest.weights)
        store = ExpertStore(expert_source, expert_store, parse_budget(expert_store_budget, files, "expert store budget"))
    if verify:  # libraries and dense weights are verified as they load (from the bytes checked), experts here and on fetch
        loaded_whole = {lib.file.path for lib in manifest.libraries} | {w.file.path for w in manifest.weights}
        fetched = {ref.path for ref in manifest.weight_files()} - loaded_whole if store else set()
        for ref in manifest.files():
            if ref.path not in loaded_whole and not (ref.path in fetched and not (root / ref.path).exists()):
                check_file(root, ref)  # (an expert to fetch on demand is verified when it comes)
    if fallback == "dense" and any(layer.fallback is None for layer in manifest.moe_layers):
        raise InputError(f"{root}: fallback 'dense' needs the dense stand-in experts, which this artifact lacks "
                         f"(compile it with --dense-fallback, or use fallback 'skip')")
    model = MoEModel(root, manifest, cache_budget, prefetch=prefetch, storage_mbps=storage_mbps, fallback=fallback,
                     verify=verify, cipher=cipher, min_expert_weight=float(min_expert_weight), store=store)
    if preload == "auto" and model._pools:  # everything fits: load it all, so decode runs resident
        model.preload_hot(1.0)
    elif preload == "auto":
        model.preload_hot_within(hot_set_bytes(model.cache.budget, manifest.token_cache_bytes))
    elif preload:
        model.preload_hot(preload)
    model.settle_memory()
    return model


class MoEModel:
    def __init__(self, root: Path, manifest: Manifest, cache_budget, prefetch: bool = False,
                 storage_mbps: float | None = None, fallback: str = "error", verify: bool = True,
                 cipher: WeightCipher | None = None, min_expert_weight: float = 0.0, store=None):
        self.root, self.manifest = root, manifest
        self.store = store  # an expert_store.ExpertStore: experts missing here come from it
        self.min_expert_weight = min_expert_weight
        self.skipped_experts = 0  # token-expert slots skipped (min_expert_weight)
        self.verify = verify
        self._cipher = cipher
        self.fallback = fallback
        self.fallbacks = {"skip": 0, "dense": 0}  # token-expert slots served by a fallback
        self.fallback_errors: list[str] = []
        self.prefetch_enabled, self.storage_mbps = prefetch, storage_mbps
        self._storage = SlowStorage(storage_mbps) if storage_mbps else None
        self.recorder = None  # a TraceRecorder while recording routing traces
        self.device = tvm_runtime.device(manifest.target.device)
        self._on_cpu = tvm_runtime.is_cpu(self.device)
        self._modules = {lib.name: _load_library(root, lib, verify) for lib in manifest.libraries}
        self._host_blocks: list = []  # the huge-page mappings of weights, settled once filled
        self._lookups: list[LookupTable] = []  # tables gathered at the token ids, held by slices
        # The dense part's weights, resident for the model's life (the segments take them as inputs).
        self._weights: dict[str, tvm_runtime.Tensor] = {}
        for weight_file in manifest.weights:
            self._weights.update(self._load_dense(weight_file))
        # A TVM VirtualMachine keeps per-call state: each thread gets its own over the shared modules.
        self._thread = threading.local()
        self._layers = {layer.layer: layer for layer in manifest.moe_layers}
        self._patterns = {layer.layer: FixedPattern(layer.router) for layer in manifest.moe_layers
                          if layer.router.mode in FIXED_MODES}
        self._experts = {(layer.layer, e.index): e for layer in manifest.moe_layers for e in layer.experts}
        self._experts.update({(layer.layer, "shared", j): s.expert
                              for layer in manifest.moe_layers for j, s in enumerate(layer.shared)})
        fallback_experts = {(layer.layer, "fallback"): layer.fallback for layer in manifest.moe_layers if layer.fallback}
        self.total_expert_bytes = manifest.cache_bytes
        self._experts.update(fallback_experts)  # loadable, but not part of the model's expert bytes
        adaptive = None
        if isinstance(cache_budget, str) and ".." in cache_budget:  # "25%..60%": adaptive (cache.AdaptiveBudget)
            low, _, high = cache_budget.partition("..")
            floor, ceiling = parse_budget(low, self.total_expert_bytes), parse_budget(high, self.total_expert_bytes)
            if floor > ceiling:
                raise InputError(f"cache budget {cache_budget!r}: the floor is above the ceiling")
            adaptive = AdaptiveBudget(floor, ceiling) if floor < ceiling else None
            cache_budget = floor
        budget = parse_budget(cache_budget, self.total_expert_bytes)
        largest = max(e.weight_bytes for e in self._experts.values())
        if budget < largest:
            raise InputError(f"cache budget {budget} bytes is below one expert ({largest} bytes)")
        # Resident layers: with every expert within the budget (nothing is ever evicted) and load
        # failures fatal, each layer whose artifact has a resident function keeps its experts in
        # one pool (its workload's slot layout), loaded into place; a decode step then runs the
        # layer in one call (router scores in, output out) once all its experts are in.
        self._pools: dict[int, tuple] = {}  # layer -> (pool tensor, workload)
        if budget >= self.total_expert_bytes and fallback == "error":
            resident = [(layer, manifest.workload(layer.experts[0].workload)) for layer in manifest.moe_layers
                        if layer.resident_function is not None]
            pools = self._resident_tensors([((layer.router.n_experts * w.slot_bytes,), "uint8") for layer, w in resident])
            self._pools = {layer.layer: (pool, w) for (layer, w), pool in zip(resident, pools)}
        self.resident_calls = 0  # layer calls that took the resident function
        # The decode step does not check the weights' and pools' shapes (artifact.DecodeStep): it
        # runs once a decode step has gone through the segments and decode functions, which do.
        self._decode_step_checked = False
        self._decode_step_tail_args: list | None = None  # its arguments after the step's own inputs
        self._checked_segments: set[str] = set()  # segments whose result count matched the manifest
        # Per-position segments whose results are the model's outputs alone (the final norm and LM
        # head): the ones a prefill may run on its last position (one in the middle feeds attention).
        outputs = {spec.name for spec in manifest.outputs}
        self._head_segments = {step.name for step in manifest.program
                               if step.per_position and set(step.outputs) <= outputs}
        self._dead_after = _dead_after(manifest.program, outputs)
        self._loads_untrimmed = 0  # expert loads since malloc last gave freed memory back
        self.cache = ExpertCache(budget, self._load_expert, adaptive)
        self.timings = Timings()
        self._timing_lock = threading.Lock()
        moe_steps = [step.layer for step in manifest.program if step.op == "moe"]
        self._next_layer = dict(zip(moe_steps, moe_steps[1:]))
        self._next_layer_order = moe_steps
        self._layer_use = LayerUse(moe_steps)  # eviction under a token's experts
        self._token_bytes = manifest.token_cache_bytes
        self._decode_step_hits = sum(self._layers[layer].router.top_k for layer in moe_steps)
        # (lookahead span, slots per layer) when every layer's routing is fixed by position
        # (tiling, cycle) and eviction can use the known future; decided once, not per layer call.
        routers = [self._layers[layer].router for layer in moe_steps]
        self._known_future = None
        if routers and all(r.mode in ("tiling", "cycle") for r in routers):
            # Every expert of a pattern recurs within one period: tile x allowed experts, or the cycle.
            span = max((r.tile * len(allowed_experts(r)) if r.mode == "tiling" else len(r.cycle)) for r in routers) + 2
            self._known_future = (span, max(r.top_k for r in routers))

    # --- the hot path ------------------------------------------------------------------------
    def run_program(self, inputs: dict[str, np.ndarray], last_position: bool = False,
                    steady: bool = False) -> dict[str, np.ndarray]:
        """Run the program on named inputs. `last_position`: the per-position segments that give
        the model's outputs (the final norm and LM head) run on the last position's rows alone, so
        the logits are (batch, 1, vocab): a prefill needs no more, and 128 positions' logits are
        25 MB at a 49k vocabulary. `steady`: every call of this step has the shapes it had the
        step before (one token on an in-place KV cache), so its intermediates come from a pool
        (see _function)."""
        self._thread.steady = steady
        try:
            return self._run_program(inputs, last_position)
        finally:
            self._thread.steady = False

    def _run_program(self, inputs: dict[str, np.ndarray], last_position: bool) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        # A decode step with every expert loaded: resident layers run as one call each (the
        # shortest host path: no routing decision, cache lookup or timing lock per layer), or
        # the whole step as one call, decided before anything else is built for the step.
        positions = inputs.get("positions")
        tokens = inputs.get("tokens")
        for table in self._lookups:  # the slices of embedding rows this step gathers
            table.fill(tokens)
        resident = self.resident and self.recorder is None and positions is not None and np.size(positions) == 1
        if resident and self._thread.__dict__.get("steady") and self._one_call_ready():
            args = [self._as_tensor(inputs[name]) for name in self.manifest.decode_step.inputs] + self._decode_step_tail()
            out = {self.manifest.outputs[0].name: self._decode_step(args)}
            self.timings.steps += time.perf_counter() - started
            return out
        env = dict(self._weights)
        env.update((name, self._as_tensor(value)) for name, value in inputs.items())
        predictions: dict[int, np.ndarray] = {}  # this call's lookahead guesses, by layer
        # What fixed-pattern routers look at: token ids and positions, one per row of an MoE input.
        where = {"tokens": None if tokens is None else np.asarray(tokens).ravel(),
                 "positions": None if positions is None else np.asarray(positions).ravel()}
        for index, step in enumerate(self.manifest.program):
            t0 = time.perf_counter()
            if step.op == "segment":
                if last_position and step.name in self._head_segments:
                    args = [env[n] if n in self._weights else self._last_rows(env[n]) for n in step.inputs]
                else:
                    args = [env[n] for n in step.inputs]
                results = self._call("segments", step.name, *args)
                if step.name not in self._checked_segments:  # once: a library returns what it returned before
                    if len(results) != len(step.outputs):
                        raise ArtifactError(f"segments:{step.name}: returns {len(results)} values, the manifest "
                                            f"names {len(step.outputs)}")
                    self._checked_segments.add(step.name)
                env.update(zip(step.outputs, tvm_runtime.results(results, len(step.outputs))))
                self.timings.segments += time.perf_counter() - t0
            elif resident and step.layer in self._pools:
                env[step.outputs[0]] = self._resident_layer(step.layer, env[step.inputs[0]])
            else:  # hidden states stay on the device; only routing decisions come to the host
                x = env[step.inputs[0]]
                rows = tvm_runtime.view(x, (int(np.prod(x.shape[:-1])), x.shape[-1]))
                env[step.outputs[0]] = tvm_runtime.view(self.moe_layer(step.layer, rows, predictions, where), x.shape)
            for name in self._dead_after[index]:
                del env[name]
        if self.recorder is not None:
            self.recorder.end_step()
        self._decode_step_checked |= resident  # every weight and pool went through a checked call
        out = {spec.name: tvm_runtime.to_numpy(env[spec.name]) for spec in self.manifest.outputs}
        self.timings.steps += time.perf_counter() - started
        return out

    def _decode_step(self, args: list) -> np.ndarray:
        """One token on the in-place cache, every expert resident: the whole program in one call
        (artifact.DecodeStep), where a step was a call per segment and per MoE layer, each with
        its Python around it. `args`: its inputs as tensors, then _decode_step_tail()."""
        t0 = time.perf_counter()
        logits = self._call("segments", self.manifest.decode_step.function, *args)
        self.timings.decode_steps += time.perf_counter() - t0
        self.resident_calls += len(self._next_layer_order)
        self.cache.stats.hits += self._decode_step_hits  # every expert a token uses is loaded
        # The step's own output, fresh each call: on the CPU NumPy takes it as it is (DLPack),
        # where a copy was a 197 KB allocation and memcpy a GraniteMoE token.
        return np.from_dlpack(logits) if self._on_cpu else tvm_runtime.to_numpy(logits)

    def _decode_step_tail(self) -> list:
        """The one-call step's arguments after its own inputs: the dense weights, then each MoE
        layer's pool in program order (made once per model)."""
        if self._decode_step_tail_args is None:
            self._decode_step_tail_args = [self._weights[name] for name in self.manifest.decode_step.weights] + \
                [self._pools[layer][0] for layer in self._next_layer_order]
        return self._decode_step_tail_args

    def _one_call_ready(self) -> bool:
        """Whether a steady decode token can take the one-call step: the artifact has one, a
        decode step already went through the checked per-segment path, and every expert is
        loaded, with no routing recorder listening."""
        return self._decode_step_checked and self.manifest.decode_step is not None and self.resident \
            and self.recorder is None

    def _steady_step_arguments(self, cache: "KVCache", token: int) -> list:
        """The one-call step's arguments for the next token on an in-place cache (on the CPU):
        made once per cache buffers and kept with the cache, the token and its position written
        into their kept arrays and the held positions a view of a kept arange (what was a dict
        of inputs, three aligned copies and ~50 conversions a token)."""
        plan = cache.steady_plan
        if plan is None or plan[0] is not cache.keys[0]:  # the first token, or buffers grown since
            (tokens_in, positions_in, *kv_in), _ = cache.io_names
            held = set(kv_in[:len(cache.held_inputs())])
            token_at, position_at = aligned_copy(np.zeros((1, 1), np.int64)), aligned_copy(np.zeros((1, 1), np.int64))
            fixed = {tokens_in: tvm_runtime.from_dlpack(token_at), positions_in: tvm_runtime.from_dlpack(position_at),
                     **dict(zip(kv_in[len(held):], [*cache.keys, *cache.values, *cache.states]))}
            names = self.manifest.decode_step.inputs
            args = [fixed.get(name) for name in names] + self._decode_step_tail()
            plan = cache.steady_plan = (cache.keys[0], args, token_at, position_at,
                                        aligned_copy(np.arange(cache.capacity, dtype=np.int64)),
                                        [i for i, name in enumerate(names) if name in held])
        _, args, token_at, position_at, arange, held_at = plan
        for table in self._lookups:
            table.fill_token(token)
        token_at[0, 0], position_at[0, 0] = token, cache.length
        past = tvm_runtime.from_dlpack(arange[:cache.length].reshape(1, cache.length))  # in place: all positions
        for i in held_at:
            args[i] = past
        return args

    def _last_rows(self, x: tvm_runtime.Tensor) -> tvm_runtime.Tensor:
        """(batch, seq, ...) -> (batch, 1, ...): the last position's rows."""
        if x.shape[1] == 1:
            return x
        return self._as_tensor(np.ascontiguousarray(tvm_runtime.to_numpy(x)[:, -1:]))

    def _as_tensor(self, value) -> tvm_runtime.Tensor:
        """An input as a tensor on the device; on the CPU a small array is wrapped, not copied
        (an upload through tvm_runtime.tensor costs ~35 us, three of them per decode token)."""
        if isinstance(value, tvm_runtime.Tensor):
            return value
        value = np.asarray(value)
        if self._on_cpu and value.size:  # (an empty array has no address to align)
            return tvm_runtime.from_dlpack(aligned_copy(value))
        return tvm_runtime.tensor(value, self.device)

    def moe_layer(self, index: int, x, predictions: dict | None = None, where: dict | None = None):
        """One MoE layer on tokens x (n, d): route, fetch each selected expert, run, fuse. x is a
        NumPy array or a device tensor; the result is of the same kind."""
        layer = self._layers[index]
        t0 = time.perf_counter()
        on_device = isinstance(x, tvm_runtime.Tensor)
        xt = x if on_device else tvm_runtime.tensor(x, self.device)
        n = xt.shape[0]
        if n == 1 and index in self._pools and self.recorder is None and self.resident:
            out = self._resident_layer(index, xt)
            return out if on_device else tvm_runtime.to_numpy(out)
        where = where if where and where.get("positions") is not None else {"tokens": None, "positions": np.arange(n)}
        indices, weights = self._route(layer, xt, where)
        t_routed = time.perf_counter()
        if self.recorder is not None:
            self.recorder.record(index, indices, weights, (predictions or {}).get(index))
        if self.min_expert_weight:
            indices, weights = skip_light_experts(indices, weights, self.min_expert_weight)
            with self._timing_lock:
                self.skipped_experts += int((indices == SKIPPED).sum())
        nxt = self._next_layer.get(index)
        # Nothing to prefetch once every expert is resident (a full budget): skip the lookahead.
        prefetching = self.prefetch_enabled and self.cache.stats.resident_bytes < self.total_expert_bytes
        order = self._future_order(index, where)
        if order is None and self.cache.budget < self._token_bytes:  # under a token's experts: by layer
            self._layer_use.note(index, [(index, int(e)) for e in np.unique(indices) if e != SKIPPED]
                                 + [(index, "shared", j) for j in range(len(layer.shared))])
            order = functools.partial(self._layer_use.order, layer=index)
        if nxt is not None and (prefetching or self.recorder is not None):
            # Gate lookahead: the next layer's router on this layer's input predicts its experts
            # (exactly, for fixed-pattern routing).
            guess, guess_weights = self._route(self._layers[nxt], xt, where)
            if predictions is not None:
                predictions[nxt] = guess
            if self.min_expert_weight:
                guess, _ = skip_light_experts(guess, guess_weights, self.min_expert_weight)
            if prefetching:
                self.cache.prefetch([(nxt, int(e)) for e in np.unique(guess) if e != SKIPPED],
                                    protected=[(index, int(e)) for e in np.unique(indices) if e != SKIPPED], order=order)
        t1 = time.perf_counter()
        fused = n == 1 and not layer.shared and not (self.min_expert_weight and (indices == SKIPPED).any())
        out = self._fused_experts(index, xt, indices, weights, order) if fused else None
        if out is None:  # a prefill, shared experts, or a token the fused call does not cover
            out = self._grouped_experts(index, tvm_runtime.to_numpy(xt) if on_device else x, xt, indices, weights, order)
            out = tvm_runtime.tensor(out, self.device) if on_device else out
        elif not on_device:
            out = tvm_runtime.to_numpy(out)
        self._add_time("routing", t_routed - t0)
        self._add_time("lookahead", t1 - t_routed)
        self._add_time("experts", time.perf_counter() - t1)
        return out

    def _resident_layer(self, index: int, x):
        """One token through a resident layer. x is (1, d) or (1, 1, d), the result of the same
        shape. A (1, 1, d) hidden state, as the segments hand it over, goes to the layer's decode
        function when the artifact has one (router and layer in one call); otherwise the router's
        scores, then the resident function, on a (1, d) view. Every Python step here runs with the
        caches just flushed by a kernel streaming megabytes (a 1 us view costs ~40 us there), so the
        layer's handles and view shapes are looked up once per thread, not per token."""
        plan = self._thread.__dict__.setdefault("resident_plans", {}).get(index) or self._resident_plan(index)
        router, layer_fn, decode, pool, row_shape, token_shape, dtype, top_k = plan
        timings = self.timings
        if decode is not None and x.ndim == 3:
            t0 = time.perf_counter()
            try:
                out = decode(x, pool)
            except tvm_runtime.CALL_ERRORS as e:
                layer = self._layers[index]
                raise _call_failed(layer.router.library, layer.decode_function, e) from None
            t1 = t0  # the router's share is inside the one call
            calls = 1
        else:
            row = x if x.ndim == 2 else tvm_runtime.view(x, row_shape, dtype)
            t0 = time.perf_counter()
            try:
                scores = router(row)
            except tvm_runtime.CALL_ERRORS as e:
                raise _call_failed(self._layers[index].router.library, self._layers[index].router.function, e) from None
            t1 = time.perf_counter()
            try:
                out = layer_fn(row, scores, pool)
            except tvm_runtime.CALL_ERRORS as e:
                layer = self._layers[index]
                raise _call_failed(self._pools[index][1].library, layer.resident_function, e) from None
            calls = 2
        t2 = time.perf_counter()
        timings.routing += t1 - t0
        timings.experts += t2 - t1
        timings.calls += t2 - t0
        timings.call_count += calls
        self.resident_calls += 1
        self.cache.stats.hits += top_k  # every expert a token uses is loaded
        return out if calls == 1 or row is x else tvm_runtime.view(out, token_shape, dtype)

    def _resident_plan(self, index: int) -> tuple:
        """This thread's (router, resident function, decode function or None, pool, (1, d),
        (1, 1, d), dtype, top_k) for a resident layer."""
        layer = self._layers[index]
        pool, workload = self._pools[index]
        d = layer.d_model
        # Steady: a resident call always takes one token.
        decode = None if layer.decode_function is None else \
            self._function(layer.router.library, layer.decode_function, steady=True)
        plan = (self._function(layer.router.library, layer.router.function, steady=True),
                self._function(workload.library, layer.resident_function, steady=True), decode, pool,
                tvm_runtime.Shape([1, d]), tvm_runtime.Shape([1, 1, d]), workload.dtype, layer.router.top_k)
        self._thread.__dict__["resident_plans"][index] = plan
        return plan

    @property
    def resident(self) -> bool:
        """Whether decode steps run the resident layers in one call: pools exist and every
        expert is loaded (a full budget never evicts, so this stays true once reached)."""
        return bool(self._pools) and self.cache.stats.resident_bytes >= self.total_expert_bytes \
            and not self.min_expert_weight

    def _grouped_experts(self, index: int, x: np.ndarray, xt, indices: np.ndarray, weights: np.ndarray,
                         order) -> np.ndarray:
        """Tokens grouped by expert, one call per selected expert, the weighted sum on the host;
        then the layer's shared experts."""
        layer = self._layers[index]
        out = np.zeros_like(x)
        failed = []
        scale_input = layer.router.scale_input
        # Each expert's rows gathered straight into memory its call reads in place (a run of one
        # buffer: its rows stay aligned where a row is a multiple of 64 bytes; _run_expert copies
        # the others). A 1024-token GraniteMoE int4 prefill makes ~6,100 expert calls.
        scratch, start = aligned_empty((indices.size, *x.shape[1:]), x.dtype), 0
        for expert, rows, w in group_by_expert(indices, weights):
            try:
                gathered = np.take(x, rows, axis=0, out=scratch[start:start + len(rows)])
                start += len(rows)
                if scale_input:  # Llama 4: the weight scales what the expert sees
                    gathered *= w[:, None]
                    out[rows] += self._run_expert((index, expert), gathered, order)
                else:
                    y = self._run_expert((index, expert), gathered, order)
                    y *= w[:, None]
                    out[rows] += y
            except (ArtifactError, OSError) as e:
                if self.fallback == "error":
                    raise
                failed.append((expert, e))
        if failed:
            out = self._fall_back(index, x, indices, weights, out, failed)
        for j, shared in enumerate(layer.shared):
            y = self._run_expert((index, "shared", j), x)
            if shared.gate_function:
                y = y * tvm_runtime.to_numpy(self._call(layer.router.library, shared.gate_function, xt))
            out += y
        return out

    def _fused_experts(self, index: int, xt, indices: np.ndarray, weights: np.ndarray, order):
        """One token's k experts in one call of their workload's fused function (weighted sum
        included), or None where that does not apply (experts of different workloads, no fused
        function for this k, or an expert that fails to load: the general path handles it)."""
        order_ids = np.argsort(indices[0], kind="stable")  # expert order, as group_by_expert (and traces) use
        keys = [(index, int(indices[0, j])) for j in order_ids]
        workload = self.manifest.workload(self._experts[keys[0]].workload)
        k = len(keys)
        if k not in workload.fused_k or any(self._experts[key].workload != workload.id for key in keys) \
                or self._layers[index].router.scale_input:  # one input for all k: weights must scale outputs
            return None
        try:
            loaded = self.cache.get_many(keys, order=order)
        except (ArtifactError, OSError):
            if self.fallback == "error":
                raise
            return None
        gates = tvm_runtime.tensor(np.ascontiguousarray(weights[0, order_ids], dtype=np.float32).reshape(1, k), self.device)
        return self._call(workload.library, fused_function(workload.function, k), xt, gates,
                          *[w for arrays in loaded for w in arrays])

    def _fall_back(self, index, x, indices, weights, out, failed) -> np.ndarray:
        """An expert could not be loaded. `skip`: each affected token renormalises its weights
        over the experts that did load. `dense`: the layer's fallback expert (the mean of its
        experts, built at compile time) stands in with the failed expert's weight."""
        layer = self._layers[index]
        lost = np.isin(indices, [e for e, _ in failed])
        with self._timing_lock:
            self.fallbacks[self.fallback] += int(lost.sum())
            self.fallback_errors.extend(f"layer {index} expert {e}: {err}" for e, err in failed)
        if self.fallback == "dense":
            if layer.fallback is None:
                raise ArtifactError(f"layer {index}: no dense fallback expert in this artifact "
                                    f"(compile it with one, or use fallback='skip')") from failed[0][1]
            rows = np.nonzero(lost.any(1))[0]
            y = self._run_expert((index, "fallback"), x[rows])
            out[rows] += y * (weights * lost).sum(1)[rows, None]
            return out
        kept = np.where(lost, 0, weights).sum(1)
        scale = np.divide(weights.sum(1), kept, out=np.zeros_like(kept), where=kept > 0)
        return out * scale[:, None]  # renormalise over the experts that remain (0 if none do)

    def _route(self, layer: MoELayer, xt, where: dict) -> tuple[np.ndarray, np.ndarray]:
        router = layer.router
        scores = tvm_runtime.to_numpy(self._call(router.library, router.function, xt)) if router.mode == "learned" else None
        return route(router, scores, where["tokens"], where["positions"], self._patterns.get(layer.layer))

    def _future_order(self, index: int, where: dict):
        """With position-determined routing (tiling, cycle) on every layer the future is known:
        order eviction candidates by next use, furthest first (Belady's MIN). Else None."""
        if self._known_future is None:
            return None
        span, slots = self._known_future
        layers = len(self._next_layer_order)
        now = int(where["positions"].max())
        current = self._next_layer_order.index(index)

        def next_use(key) -> float:
            layer, expert = key[0], key[1]
            li = self._next_layer_order.index(layer)
            pattern = self._patterns[layer]
            for q in range(now, now + span):
                if q == now and li < current:
                    continue  # this layer already ran for the current position
                chosen = sorted(pattern.experts(None, np.array([q]))[0].tolist())
                if expert in chosen:
                    return ((q - now) * layers + li) * slots + chosen.index(expert)
            return float("inf")

        return lambda keys: sorted(keys, key=next_use, reverse=True)

    def adopt_experts(self, previous: "MoEModel") -> int:
        """Pick up a new artifact version without reloading what did not change: every expert
        resident in `previous` whose file hash is the same here moves into this model's cache
        (an update then ships and loads only new or changed experts). Returns how many."""
        adopted = 0
        for key in previous.cache.keys():
            old, new = previous._experts.get(key), self._experts.get(key)
            if old is None or new is None or old.file.sha256 != new.file.sha256 or old.workload != new.workload:
                continue
            value = previous.cache.get(key)
            if isinstance(key[1], int) and key[0] in self._pools:  # into this model's pool, not a view of the old one
                value = self._into_slot(key, {spec.name: v for spec, v in zip(self.manifest.workload(new.workload).params, value)})
            with self.cache._lock:
                if key not in self.cache._entries and self.cache._insert(key, value, new.weight_bytes,
                                                                          prefetched=False, protected=()):
                    adopted += 1
        return adopted

    def start_trace(self) -> None:
        """Record every routing decision (and the lookahead predictions) from now on."""
        from .trace import TraceRecorder

        self.recorder = TraceRecorder.for_manifest(self.manifest)

    def stop_trace(self):
        """The recorded `RoutingTrace`; recording stops."""
        recorder, self.recorder = self.recorder, None
        return recorder.to_trace()

    def preload_hot(self, fraction: float) -> int:
        """Load and pin the hottest `fraction` of experts (usage profile from calibration); the
        pinned bytes must leave room in the cache budget for at least one more expert."""
        ranked = self._hottest_first()
        chosen = ranked[: round(fraction * len(ranked))]
        pinned = sum(self._experts[key].weight_bytes for key in chosen)
        unpinned = max((e.weight_bytes for key, e in self._experts.items() if key not in set(chosen)), default=0)
        if chosen and pinned + unpinned > self.cache.budget:
            raise InputError(f"preload {fraction:g} pins {pinned} bytes of experts, which leaves no room for other "
                             f"experts in the {self.cache.budget}-byte cache budget: lower the preload or raise the budget")
        return self.cache.preload(chosen)

    def preload_hot_within(self, nbytes: float) -> int:
        """Load and pin the hottest experts (by the usage profile) whose bytes fit in `nbytes`."""
        chosen, total = [], 0
        for key in self._hottest_first():
            if not self._experts[key].usage:
                break  # unprofiled or never used: nothing says it is hot
            size = self._experts[key].weight_bytes
            if total + size <= nbytes:
                chosen.append(key)
                total += size
        return self.cache.preload(chosen)

    def _hottest_first(self) -> list:
        """Routed experts, most used first by the artifact's usage profile (unprofiled last)."""
        return [key for _, key in sorted(((e.usage or 0.0, key) for key, e in self._experts.items()
                                          if isinstance(key[1], int)), reverse=True)]

    def _run_expert(self, key, rows: np.ndarray, order=None) -> np.ndarray:
        """Expert `key` on token rows (n, d): its output rows, an array the caller owns (on the
        CPU the call's result itself, not a copy). Rows in aligned memory (aligned_empty) are
        read in place on the CPU."""
        weights = self.cache.get(key, order=order)
        workload = self.manifest.workload(self._experts[key].workload)
        in_place = self._on_cpu and str(rows.dtype) in _DLPACK_DTYPES and rows.flags.c_contiguous \
            and rows.ctypes.data % ALIGN == 0
        x = tvm_runtime.from_dlpack(rows) if in_place else tvm_runtime.tensor(np.ascontiguousarray(rows), self.device)
        y = self._call(workload.library, workload.function, x, *weights)
        return np.from_dlpack(y) if self._on_cpu and str(y.dtype) in _DLPACK_DTYPES else tvm_runtime.to_numpy(y)

    def _call(self, library: str, function: str, *args):
        steady = self._thread.__dict__.get("steady", False)
        fn = self._thread.__dict__.get("functions", {}).get((library, function, steady)) \
            or self._function(library, function, steady)
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except tvm_runtime.CALL_ERRORS as e:
            raise _call_failed(library, function, e) from None
        self.timings.calls += time.perf_counter() - t0
        self.timings.call_count += 1
        return result

    def _function(self, library: str, function: str, steady: bool = False):
        """This thread's handle on a compiled function (kept: a lookup per call costs more than
        many kernels at decode). On the CPU a library has two VMs: TVM's pooled allocator keeps a
        buffer of every size it has seen, so it serves only `steady` calls, whose shapes repeat (a
        decode step on an in-place cache: the pool holds one step's intermediates); the others
        (prefill chunks of any length, a concatenated cache growing a position a token) allocate
        and free each intermediate. A decode step allocates ~12 intermediates a segment: pooled,
        libc's share of an int4 GraniteMoE token fell from 3.2-3.4% to 2.3-2.4% of perf's samples
        and the share outside kernels from 16.3-17.1% to 14.7-15.0% (profile_decode.py, 1 thread)."""
        naive = self._on_cpu and not steady
        vms = self._thread.__dict__.setdefault("vms", {})
        if (library, naive) not in vms:
            vms[library, naive] = tvm_runtime.VirtualMachine(self._modules[library], self.device, naive=naive)
        try:
            fn = vms[library, naive][function]
        except AttributeError:
            raise ArtifactError(f"{library}: the library has no function {function!r} the manifest names") from None
        self._thread.__dict__.setdefault("functions", {})[(library, function, steady)] = fn
        return fn

    def _load_expert(self, key) -> tuple[list, int]:
        """Read, verify and upload one expert's weights (the cache's loader)."""
        expert: Expert = self._experts[key]
        if self._storage is not None:
            self._storage.read(expert.file.size)
        workload = self.manifest.workload(expert.workload)
        if isinstance(key[1], int) and key[0] in self._pools:
            tensors = self._into_slot(key, self._read_tensors(expert.file, workload.params)[0])
        else:
            tensors = list(self._load_tensors(expert.file, workload.params).values())
        self._loads_untrimmed += 1  # (approximate across the loader thread: only a cadence)
        if self._loads_untrimmed >= TRIM_EVERY_LOADS:
            self._loads_untrimmed = 0
            release_freed_memory()
        return tensors, expert.weight_bytes

    def _into_slot(self, key, tensors: dict) -> list:
        """Write one expert's tensors into its slot of the layer's pool; their views there."""
        pool, workload = self._pools[key[0]]
        views = []
        for spec, offset in zip(workload.params, workload.slot_offsets):
            view = tvm_runtime.view(pool, spec.shape, spec.dtype, key[1] * workload.slot_bytes + offset)
            views.append(tvm_runtime.copy_into(view, tensors[spec.name]))
        return views

    def _resident_tensors(self, specs: list[tuple[tuple[int, ...], str]]) -> list[tvm_runtime.Tensor]:
        """Tensors of these (shape, dtype)s for what every token reads (weights, expert pools), to
        be filled by the caller: on the CPU in one huge-page block, each a zero-offset tensor."""
        if not self._on_cpu or not specs:
            return [tvm_runtime.empty(shape, dtype, self.device) for shape, dtype in specs]
        block, arrays = host_arrays([(shape, tvm_runtime.numpy_dtype(dtype)) for shape, dtype in specs])
        self._host_blocks.append(block)
        return [tvm_runtime.wrap(array) for array in arrays]

    def settle_memory(self) -> None:
        """Collapse the filled weight blocks into huge pages where their faults got small ones
        (host_memory.settle), and hand back what loading freed (its read buffers); load_model
        calls it after preloading."""
        settle(self._host_blocks)
        release_freed_memory()

    def _load_dense(self, weight_file) -> dict[str, tvm_runtime.Tensor]:
        """One dense weight file's tensors, verified, in one block of resident tensors; a table
        gathered only at the token ids (lookup_table.py) is held by the slices tokens reach, on
        the CPU, from a plain file of the artifact (not decrypted in memory, not from a store)."""
        ref = weight_file.file
        arrays, offsets = self._read_tensors(ref, weight_file.tensors)
        sliced = self._on_cpu and offsets is not None  # the table's slices are read again from the file
        lookups = [t for t in weight_file.tensors if t.lookup_rows is not None] if sliced else []
        out = {}
        for spec in lookups:
            table = LookupTable(self.root / ref.path, offsets[spec.name], arrays.pop(spec.name), spec.lookup_rows)
            self._lookups.append(table)
            out[spec.name] = tvm_runtime.wrap(table.array)
        whole = [t for t in weight_file.tensors if t.name in arrays]
        for spec, tensor in zip(whole, self._resident_tensors([(tuple(t.shape), t.dtype) for t in whole])):
            tvm_runtime.copy_into(tensor, arrays.pop(spec.name))
            out[spec.name] = tensor
        return out

    def _load_tensors(self, ref, specs) -> dict[str, tvm_runtime.Tensor]:
        """The tensors `specs` of one safetensors file, read once, verified, on the device (on the
        CPU, where they lie in the file's buffer: weight_files.py)."""
        arrays, _ = self._read_tensors(ref, specs)
        return {name: as_tensor(array, self.device, self._on_cpu) for name, array in arrays.items()}

    def _read_tensors(self, ref, specs) -> tuple[dict[str, np.ndarray], dict[str, int] | None]:
        """The arrays `specs` of one safetensors file, read once and verified, as views of its
        bytes, and their byte offsets in the artifact's file (weight_files.tensors_of), or None
        where the bytes are not the file's own (fetched from the store, or decrypted)."""
        if self.store is not None and not (self.root / ref.path).exists():
            data = self.store.read(ref)  # verified against the manifest on the way in
        elif self._cipher is not None:
            data = self._cipher.decrypt(ref.path, read_verified(self.root, ref, self.verify))  # in memory only
        else:  # (also catches files changed after load)
            return tensors_of(read_weight_file(self.root, ref, self.verify), specs, ref.path)
        return tensors_of(data, specs, ref.path)[0], None

    def _add_time(self, what: str, seconds: float) -> None:
        with self._timing_lock:
            setattr(self.timings, what, getattr(self.timings, what) + seconds)

    # --- user-facing calls -------------------------------------------------------------------
    def __call__(self, inputs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        """Token ids (batch, seq) -> logits (batch, seq, vocab) for an LM; hidden states ->
        outputs for an MoE block; for a graph, an array (one input) or {name: array} at the
        compiled shapes -> its output array (or {name: array} for several)."""
        if self.manifest.kind == "graph":
            return self._run_graph(inputs)
        if self.manifest.kind == "moe_block":
            spec = self.manifest.inputs[0]  # a lone MoE block is per token: any leading dims
            x = _check_array(inputs, spec.dtype, max(np.ndim(inputs), 2), "hidden states")
            if x.shape[-1] != spec.shape[-1]:
                raise InputError(f"hidden states have size {x.shape[-1]}, the block expects {spec.shape[-1]}")
            return self.run_program({spec.name: x})[self.manifest.outputs[0].name]
        tokens = self._check_tokens(inputs)
        logits, _ = self._lm_step(tokens, KVCache.empty(self.manifest, tokens.shape[0]))
        return logits

    def _run_graph(self, inputs) -> np.ndarray | dict[str, np.ndarray]:
        specs = self.manifest.inputs
        given = inputs if isinstance(inputs, dict) else {specs[0].name: inputs} if len(specs) == 1 else {}
        if set(given) != {s.name for s in specs}:
            raise InputError(f"the graph takes inputs {[s.name for s in specs]}, got {sorted(given)}")
        checked = {}
        for spec in specs:
            array = _check_array(given[spec.name], spec.dtype, len(spec.shape), spec.name)
            if list(array.shape) != spec.shape:
                raise InputError(f"{spec.name}: expected shape {spec.shape} (the graph was compiled for fixed "
                                 f"shapes), got {list(array.shape)}")
            limit = self.manifest.model.index_limits.get(spec.name)
            if limit is not None and array.size and (array.min() < 0 or array.max() >= limit):
                raise InputError(f"{spec.name}: indices must be in [0, {limit}), got [{array.min()}, {array.max()}]")
            checked[spec.name] = array
        out = self.run_program(checked)
        return out[self.manifest.outputs[0].name] if len(self.manifest.outputs) == 1 else out

    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = _check_array(tokens, "int64", 2, "token ids")
        vocab = self.manifest.model.vocab_size
        if vocab and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise InputError(f"token ids must be in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]")
        if tokens.shape[1] == 0:
            raise InputError("token ids: empty sequence")
        return tokens

    def new_cache(self, batch: int = 1) -> "KVCache":
        """An empty KV cache for `step`."""
        return KVCache.empty(self.manifest, batch)

    def step(self, tokens, cache: "KVCache", last_only: bool = False) -> tuple[np.ndarray, "KVCache"]:
        """One forward step of a causal LM: token ids (batch, seq) at the positions after the
        `cache.length` the cache holds; returns the logits (batch, seq, vocab) and the cache
        holding seq more positions (the same object where the artifact's KV cache is in place).
        `last_only`: the logits of the last position alone, (batch, 1, vocab), as a prefill before
        sampling needs; the LM head then runs on one position (where the artifact marks its final
        segment per_position; format 10 on)."""
        if self.manifest.kind != "causal_lm":
            raise InputError(f"step needs a causal LM artifact; this one is a {self.manifest.kind}")
        logits, cache = self._lm_step(self._check_tokens(tokens), cache, last_only)
        return (logits[:, -1:] if last_only else logits), cache

    def router_scores(self, layer: int, hidden) -> np.ndarray:
        """The learned router of MoE layer `layer` on hidden states (n, d_model): scores
        (n, n_experts), its score function applied."""
        if layer not in self._layers or self._layers[layer].router.mode != "learned":
            raise InputError(f"MoE layer {layer}: no learned router (layers with one: "
                             f"{sorted(i for i, x in self._layers.items() if x.router.mode == 'learned')})")
        router = self._layers[layer].router
        x = _check_array(hidden, "float32", 2, "hidden states")
        if x.shape[1] != self._layers[layer].d_model:
            raise InputError(f"hidden states have size {x.shape[1]}, layer {layer} takes {self._layers[layer].d_model}")
        return tvm_runtime.to_numpy(self._call(router.library, router.function, self._as_tensor(x)))

    def _lm_step(self, tokens: np.ndarray, cache: "KVCache", last_only: bool = False) -> tuple[np.ndarray, "KVCache"]:
        b, s = tokens.shape
        p = cache.length
        limit = self.manifest.model.max_positions
        if limit and p + s > limit:
            raise InputError(f"sequence of {p + s} tokens exceeds the model's {limit} positions")
        if cache.batch != b:
            raise InputError(f"a KV cache of batch {cache.batch} cannot take tokens of batch {b}")
        if b == s == 1 and cache.layout == "in_place" and self._on_cpu and p < cache.capacity and self._one_call_ready():
            started, self._thread.steady = time.perf_counter(), True  # (see run_program)
            try:
                logits = self._decode_step(self._steady_step_arguments(cache, int(tokens[0, 0])))
            finally:
                self._thread.steady = False
            cache.length = p + 1
            self.timings.steps += time.perf_counter() - started
            return logits, cache
        (tokens_in, positions_in, *kv_in), (logits_out, *kv_out) = cache.io_names
        held = cache.held_inputs()
        inputs = {tokens_in: tokens, positions_in: np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()}
        for name, positions in zip(kv_in, held):
            inputs[name] = np.broadcast_to(positions, (b, positions.size)).copy()
        kv_in = kv_in[len(held):]
        if cache.layout == "in_place":
            cache.reserve(p + s, self.device, limit)
        inputs.update(zip(kv_in, [*cache.keys, *cache.values, *cache.states]))
        out = self.run_program(inputs, last_position=last_only, steady=cache.layout == "in_place" and s == 1)
        if cache.layout == "in_place":
            cache.length = p + s  # the step wrote its keys and values into the buffers
            return out[logits_out], cache
        layers = len(kv_out) // 2
        # What the next step's queries can still see: the last window - 1 positions, or the
        # current chunk's.
        bounded = cache.window - 1 if cache.window else (p + s) % cache.chunk if cache.chunk else None
        windowed = slice(None) if bounded is None else slice(-bounded, None) if bounded else slice(0, 0)
        keep = [slice(None) if i % layers in cache.full_layers else windowed for i in range(2 * layers)]
        # a copy when trimmed: the rest is freed
        kept = [np.ascontiguousarray(out[n][:, :, k]) if k != slice(None) else out[n] for n, k in zip(kv_out, keep)]
        return out[logits_out], KVCache(cache.manifest, b, kept[:layers], kept[layers:], length=p + s)

    def check_generation(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """InputError, before any work, when `generate` could not finish: not a causal LM, no
        prompt, a negative count, or more positions than the model has."""
        if self.manifest.kind != "causal_lm":
            raise InputError(f"generate needs a causal LM artifact; this one is a {self.manifest.kind} "
                             f"(call the model on its inputs instead)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if prompt_tokens < 1:
            raise InputError("generate needs a prompt of at least one token")
        limit = self.manifest.model.max_positions
        needed = prompt_tokens + max(int(max_new_tokens) - 1, 0)  # the last new token is never fed back
        if limit and needed > limit:
            raise InputError(f"a {prompt_tokens}-token prompt plus {max_new_tokens} new tokens needs {needed} positions; "
                             f"the model has {limit} (at most {limit - prompt_tokens + 1} new tokens)")

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The artifact's tokenizer (runtime/tokenizer.py), None when it ships none."""
        return load_tokenizer(self.root, self.manifest, self.verify)

    def stream(self, prompt, max_new_tokens: int = 64, *, stop: tuple[str, ...] | list[str] = (),
               ignore_eos: bool = False, **sampling) -> Generation:
        """A generation from one prompt, made as it is iterated (runtime/generation.py): text (encoded
        with the artifact's tokenizer), token ids (a 1-D sequence or a (1, seq) batch of one), or a
        chat, messages [{"role": ..., "content": ...}] rendered with the model's chat template.
        It ends at max_new_tokens, at an end-of-sequence id (unless ignore_eos) or at a stop string
        (`stop`, never part of the text). sampling: Sampling's fields (temperature 0, the default,
        is greedy)."""
        unknown = set(sampling) - _SAMPLING_FIELDS
        if unknown:
            raise GenerationError(f"unknown generation option(s) {sorted(unknown)}; "
                                  f"sampling takes {', '.join(sorted(_SAMPLING_FIELDS))}")
        params = Sampling(**sampling)
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) for s in stop):
            raise GenerationError(f"stop must be text or a list of texts, got {stop!r}")
        tokenizer = self.tokenizer
        if isinstance(prompt, str) or _is_chat(prompt) or stop:
            if tokenizer is None:
                raise GenerationError(f"{self.root}: this artifact ships no tokenizer (its model directory had no "
                                      f"tokenizer.json): give the prompt as token ids, without stop strings")
        if isinstance(prompt, str):
            prompt = tokenizer.encode(prompt)
        elif _is_chat(prompt):
            prompt = tokenizer.chat_ids(prompt)
        ids = np.asarray(prompt)
        if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
            raise InputError(f"generate takes one prompt (a 1-D sequence of token ids), got shape {ids.shape}; "
                             f"run a batch through the model call instead")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token ids must be integers, got {ids.dtype}")
        self.check_generation(ids.size, max_new_tokens)
        tokens = self._check_tokens(ids.astype(np.int64).reshape(1, -1))
        eos = () if ignore_eos or tokenizer is None else tokenizer.eos_token_ids
        return Generation(self._decode(tokens, int(max_new_tokens), Sampler(params)), tokens.shape[1], eos, tuple(stop),
                          tokenizer.decoder() if tokenizer is not None else None)

    def generate(self, prompt, max_new_tokens: int = 64, *, stream: Callable[[Token], None] | None = None,
                 **options) -> list[int]:
        """The new token ids of one generation (`stream` as above, with its options); `stream`,
        when given, is called with each Token (id, and the text it adds) as it is made."""
        return self.stream(prompt, max_new_tokens, **options).run(stream).token_ids

    def _decode(self, tokens: np.ndarray, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
        """Prefill, then one step per new token; each token is yielded before the next is computed,
        and the last one is never fed back."""
        history = tokens[0].tolist()
        cache = KVCache.empty(self.manifest, 1)
        t0 = time.perf_counter()
        if cache.layout == "in_place":
            # Every position the generation can reach, once, as part of the prefill: growing by
            # doubling mid-generation stalls one token for the copy and the new pages' first
            # touch (GraniteMoE at 1024 positions: 0.3-0.4 s, against 28 ms per token).
            cache.reserve(tokens.shape[1] + max(max_new_tokens - 1, 0), self.device, self.manifest.model.max_positions,
                          exact=True)
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            logits = None  # a chunk's logits are dropped before the next: only the last row is sampled
            logits, cache = self._lm_step(tokens[:, start:start + PREFILL_CHUNK], cache, last_only=True)
        release_freed_memory()  # what malloc kept of the prefill's buffers
        self.timings.prefill.append(time.perf_counter() - t0)
        for produced in range(1, max_new_tokens + 1):
            token = sampler(logits[0, -1], history)
            history.append(token)
            yield token
            if produced == max_new_tokens:
                return
            t0, in_calls = time.perf_counter(), self.timings.calls
            logits, cache = self._lm_step(np.array([[token]], dtype=np.int64), cache)
            took = time.perf_counter() - t0
            self.timings.token_latencies.append(took)
            self.timings.decode_tokens += 1
            self.timings.decode_seconds += took
            self.timings.decode_calls += self.timings.calls - in_calls

    def stats(self) -> dict:
        c, timings = self.cache.stats, self.timings
        lat = np.array(self.timings.token_latencies) * 1e3
        pct = {f"p{q}": (float(np.percentile(lat, q)) if lat.size else None) for q in (50, 95, 99)}
        prefetch = {
            "enabled": self.prefetch_enabled,
            "requests": c.prefetch_requests,
            "loads": c.prefetch_loads,
            "useful": c.prefetch_useful,
            "wasted": c.prefetch_wasted,
            "skipped": c.prefetch_skipped,
            "failed": c.prefetch_failed,
            "demand_waits": c.demand_waits,
            "precision": c.prefetch_useful / c.prefetch_loads if c.prefetch_loads else None,
            "recall": c.prefetch_useful / (c.prefetch_useful + c.misses) if c.prefetch_useful + c.misses else None,
        }
        return {
            "fallbacks": dict(self.fallbacks),
            "fallback_errors": list(self.fallback_errors),
            "prefetch": prefetch,
            "preloaded": c.preloaded,
            "hit_rate": c.hit_rate,
            "hits": c.hits,
            "misses": c.misses,
            "expert_loads": c.loads,
            "evictions": c.evictions,
            "expert_load_ms": c.load_seconds * 1e3,
            "loaded_bytes": c.loaded_bytes,
            "storage_mb_per_s": (c.loaded_bytes / c.load_seconds / 1e6) if c.load_seconds else None,
            "resident_expert_bytes": c.resident_bytes,
            "peak_resident_expert_bytes": c.peak_resident_bytes,
            "cache_budget_bytes": self.cache.budget,
            **({"cache_budget_range": [self.cache.adaptive.floor, self.cache.adaptive.ceiling],
                "cache_budget_history": [list(change) for change in self.cache.budget_history]}
               if self.cache.adaptive else {}),
            "total_expert_bytes": self.total_expert_bytes,
            # tables gathered at the token ids, held by the slices read so far (lookup_table.py)
            **({"lookup_tables": {"slices_read": sum(t.slices_read for t in self._lookups),
                                  "slices": sum(t.shape[0] for t in self._lookups),
                                  "resident_bytes": sum(t.resident_bytes for t in self._lookups),
                                  "bytes": sum(t.array.nbytes for t in self._lookups)}} if self._lookups else {}),
            "latency_ms": pct,
            "decode_tokens": self.timings.decode_tokens,
            "prefill_ms": [t * 1e3 for t in self.timings.prefill],
            "time_ms": {k: getattr(self.timings, k) * 1e3
                        for k in ("segments", "routing", "lookahead", "experts", "decode_steps")},
            # The host's share: everything a step does outside compiled code (Python dispatch,
            # routing decisions, cache bookkeeping, conversions), over the decode steps (over all
            # steps when nothing was decoded).
            "compiled_calls": self.timings.call_count,
            "resident_layer_calls": self.resident_calls,
            "skipped_experts": self.skipped_experts,
            **({"expert_store": {**dataclasses.asdict(self.store.stats), "stored_bytes": self.store.stored_bytes(),
                                 "budget_bytes": self.store.budget}} if self.store is not None else {}),
            "outside_compiled_share": (1 - timings.decode_calls / timings.decode_seconds) if timings.decode_seconds else
                                      (1 - timings.calls / timings.steps) if timings.steps else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


class KVCache:
    """An LM's keys and values, in the artifact's layout (artifact.kv_cache). in_place: device
    buffers per layer that the steps write into; their capacity grows by doubling (copying what
    is cached, amortised O(1) per token), so memory follows the context actually used; stateful
    layers' states (kv_cache.states) are buffers of a fixed size, made once.
    concat: the past keys/values as arrays, replaced by each step's extended ones; with a sliding
    window, only the last window - 1 positions of them (all the next step can attend to), with
    chunked attention the current chunk's, in every layer but the `full_layers`, which keep all."""

    INITIAL_CAPACITY = 256

    def __init__(self, manifest: Manifest, batch: int, keys=None, values=None, length: int = 0):
        self.manifest, self.batch, self.length = manifest, batch, length
        info = manifest.model.kv
        self.layout, self.dtype, self.multiple, self.window = info.layout, info.dtype, info.capacity_multiple, info.window
        self.full_layers, self.chunk = info.full_layers, info.chunk
        layers, (key_heads, key_dim), (value_heads, value_dim) = manifest.model.kv_shapes
        if keys is None and self.layout == "concat":
            keys = [np.zeros((batch, key_heads, 0, key_dim), np.float32)] * layers
            values = [np.zeros((batch, value_heads, 0, value_dim), np.float32)] * layers
        self.keys, self.values = keys or [], values or []
        self.states = []  # in_place: one buffer per kv_cache.states entry, made at the first reserve
        self.steady_plan = None  # in_place: the one-call step's arguments (Model._steady_step_arguments)
        self._layers = layers
        self.io_names = manifest.model.io_names  # the step's (inputs, outputs), in order: computed once per manifest

    @staticmethod
    def empty(manifest: Manifest, batch: int) -> "KVCache":
        return KVCache(manifest, batch)

    def held_positions(self, layer: int = 0) -> np.ndarray:
        """The positions whose keys and values KV layer `layer` holds (concat: the last ones, in order)."""
        held = self.keys[layer].shape[2] if self.layout == "concat" and self.keys else self.length
        return np.arange(self.length - held, self.length, dtype=np.int64)

    def held_inputs(self) -> list[np.ndarray]:
        """The step's held-position inputs: `past_positions` (what a full layer holds) and, where
        only some layers are bounded (kv_cache.full_layers), `window_positions` (what they hold)."""
        if not self.full_layers:
            return [self.held_positions()]
        bounded = next(i for i in range(self._layers) if i not in self.full_layers)
        return [self.held_positions(self.full_layers[0]), self.held_positions(bounded)]

    @property
    def capacity(self) -> int:
        return self.manifest.model.kv.capacity_of(self.keys[0].shape) if self.layout == "in_place" and self.keys else 0

    def reserve(self, positions: int, device, limit: int | None = None, exact: bool = False) -> None:
        """In-place buffers for at least `positions` positions (doubling), the cached ones kept.
        `exact`: the caller knows every position it will write (a generation: prompt + new
        tokens), so no more than that, to the capacity multiple: the doubling's minimum of 256
        positions is 24 MB of fp32 GraniteMoE cache, resident at the first write (huge pages)."""
        if len(self.states) < len(self.manifest.model.kv.states):
            # Whatever they hold is read as zeros at the first step (artifact.LayerState).
            self.states = _device_tensors([aligned_copy(np.zeros((self.batch, *state.shape), state.dtype))
                                           for state in self.manifest.model.kv.states], device)
        if positions <= self.capacity:
            return
        capacity = positions if exact else max(self.capacity, self.INITIAL_CAPACITY)
        while capacity < positions:
            capacity *= 2
        if limit:
            capacity = min(capacity, max(limit, positions))
        capacity = -(-capacity // self.multiple) * self.multiple
        layers = self._layers
        key_buffer, value_buffer = self.manifest.model.kv.buffer_shapes(self.manifest.model.kv_layout, self.batch, capacity)
        shapes = [key_buffer] * layers + [value_buffer] * layers
        # Read whole by every token at long contexts, as the weights are: one huge-page block on the CPU.
        buffers = host_arrays([(shape, self.dtype) for shape in shapes])[1] if tvm_runtime.is_cpu(device) else \
            [np.zeros(shape, self.dtype) for shape in shapes]
        for new, old in zip(buffers, self.keys + self.values):  # what is cached, kept: the old buffers
            old = tvm_runtime.to_numpy(old)  # fill the new ones' leading capacity
            new[tuple(slice(0, n) for n in old.shape)] = old
        tensors = _device_tensors(buffers, device)
        self.keys, self.values = tensors[:layers], tensors[layers:]


def _device_tensors(arrays: list[np.ndarray], device) -> list:
    """The arrays as TVM tensors on `device`: the arrays themselves on the CPU (no copy)."""
    on_cpu = tvm_runtime.is_cpu(device)
    return [tvm_runtime.from_dlpack(a) if on_cpu else tvm_runtime.tensor(a, device) for a in arrays]


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(Sampling)}
_DLPACK_DTYPES = ("float32", "float16")  # results NumPy takes over by DLPack (it has no bfloat16)


def _is_chat(prompt) -> bool:
    """A conversation: a list of message objects (a list of ids is a prompt of token ids)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _call_failed(library: str, function: str, error: Exception) -> ArtifactError:
    """Inputs were validated before any call: a failing one means the manifest and the library
    disagree (argument count, shapes or dtypes)."""
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return ArtifactError(f"{library}:{function}: call failed, the manifest does not match the library ({first})")


# Libraries loaded in this process, by SHA-256. TVM keeps every loaded library for the life of
# the process (its functions may outlive the module object), so loading the same bytes again for
# each model would only grow memory; the hash names the code exactly, so a hit is the same code.
_LOADED: dict[str, tvm_runtime.Module] = {}
_LOADED_LOCK = threading.Lock()


def _dead_after(program, outputs: set[str]) -> list[list[str]]:
    """For each step of the program, the values no later step reads and the program does not
    return: dropped right after it, so a prefill chunk holds one layer's intermediates at a time
    instead of every layer's (int4s GraniteMoE, a 128-token chunk: malloc's bytes in use by the
    last layer 50 -> 17 MB, the chunk's peak RSS over the loaded model ~92 -> ~66 MB; the rest is
    malloc's free space in pieces, handed back after the prefill). Weights live on in the model:
    dropping their name is free."""
    last = {}
    for index, step in enumerate(program):
        last.update((name, index) for name in step.outputs)  # an unread result dies where it is made
        last.update((name, index) for name in step.inputs)
    dead: list[list[str]] = [[] for _ in program]
    for name, index in last.items():
        if name not in outputs:
            dead[index].append(name)
    return dead


def _load_library(root: Path, lib, verify: bool = True) -> tvm_runtime.Module:
    """Load a kernel library from exactly the bytes whose hash was checked: they are copied,
    while hashed, through one descriptor into a sealed memory file (Linux memfd), which the
    dynamic loader opens; where there is no memfd, into a file in a private temp directory. A
    library swapped on disk after the check is never the one loaded."""
    with _LOADED_LOCK:
        loaded = _LOADED.get(lib.file.sha256)
        if loaded is None:
            loaded = _LOADED[lib.file.sha256] = _load_verified_library(root, lib, verify)
        elif verify:
            check_file(root, lib.file)  # the artifact on disk must still be intact
    return loaded


def _load_verified_library(root: Path, lib, verify: bool) -> tvm_runtime.Module:
    import tempfile

    private = Path(tempfile.mkdtemp(prefix="moetvm-lib-"))
    fd = None
    try:
        name = private / Path(lib.file.path).name  # the loader picks its format by the suffix
        try:
            fd = os.memfd_create(name.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            fd = None
        target = open(fd, "wb", closefd=False) if fd is not None else open(name, "xb")
        with target:
            copy_verified(root, lib.file, target.write, verify)
        if fd is not None:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            os.symlink(f"/proc/self/fd/{fd}", name)
        try:
            return tvm_runtime.load_module(str(name))
        except Exception as e:  # noqa: BLE001 - whatever TVM says, the file is not a usable library
            _check_machine(lib, name.read_bytes()[:20])  # the common cause, named as such
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{lib.file.path}: not a loadable kernel library ({first})") from None
    finally:
        if fd is not None:
            os.close(fd)  # the loader holds its own mapping
        shutil.rmtree(private, ignore_errors=True)


_ELF_MACHINES = {62: "x86-64", 183: "aarch64", 40: "arm", 243: "riscv"}


def _check_machine(lib, header: bytes) -> None:
    """A library built for another machine (a cross-compiled artifact run on the workstation)
    is named as such, not reported by the loader as 'No such file or directory'."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return
    built = _ELF_MACHINES.get(int.from_bytes(header[18:20], "little" if header[5] == 1 else "big"))
    here = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine())
    if built and built != here:
        raise ArtifactError(f"{lib.file.path}: built for {built}, this machine is {here} "
                            f"(run it on its board, e.g. with `moetvm deploy`)")


def _check_array(value, dtype: str, ndim: int, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise InputError(f"{what}: expected {ndim} dimensions, got shape {array.shape}")
    if str(array.dtype) != dtype:
        if dtype == "int64" and np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int64)
        raise InputError(f"{what}: expected dtype {dtype}, got {array.dtype}")
    return np.ascontiguousarray(array)
