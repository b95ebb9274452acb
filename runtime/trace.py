"""Routing traces: which experts each MoE layer selected, call by call, for offline cache studies.

A trace is what the runtime saw: for every forward call (a *step*: a prefill or one decode token)
and every MoE layer it ran, the experts and weights each token chose, and optionally the experts
the runtime *predicted* for that layer before running it (e.g. this layer's router applied to
the previous layer's input). `runtime.simulator` replays a trace against cache policies.

The file is one `.npz` (numpy + stdlib only, no pickle, so it loads on a board): a JSON header
(format version, layers, expert sizes) and flat arrays holding every (step, layer) record. This
module imports nothing beyond numpy and the standard library: it runs in the runtime's hot path.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moetvm.errors import MoetvmError

FORMAT = "moetvm-routing-trace"
FORMAT_VERSION = 1

Key = tuple[int, int]  # (layer, expert): the runtime cache's key for a routed expert


class TraceError(MoetvmError, ValueError):
    """A routing trace that is malformed, inconsistent or not a trace at all."""


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer in one step: per token, the top-k experts and their weights."""

    indices: np.ndarray  # (tokens, k) int16/int32 expert ids
    weights: np.ndarray  # (tokens, k) float32
    predicted: np.ndarray | None = None  # (tokens', k') int expert ids predicted before the layer ran

    def experts(self) -> list[int]:
        """The experts the runtime fetches for this layer: selected by any token, ascending."""
        return np.unique(self.indices).tolist()

    def predicted_experts(self) -> list[int] | None:
        return None if self.predicted is None else np.unique(self.predicted).tolist()


# One forward call: layer -> its routing, in the order the layers ran (dicts keep insertion order).
Step = dict[int, LayerRouting]


@dataclass
class RoutingTrace:
    """Routing of a run. Layer ids index `n_experts`; a layer with 0 experts is not an MoE layer
    (models whose MoE layers are numbered sparsely keep their ids)."""

    n_layers: int
    n_experts: list[int]  # per layer id
    expert_bytes: dict[Key, int]  # bytes each routed expert occupies in the cache
    steps: list[Step] = field(default_factory=list)
    shared_bytes: int = 0  # the shared (always-run) experts' bytes, which share the runtime's cache

    @property
    def total_bytes(self) -> int:
        """All routed experts' bytes."""
        return sum(self.expert_bytes.values())

    @property
    def budget_base(self) -> int:
        """What a percentage cache budget is a percentage of, as in the runtime: every expert's
        bytes, routed and shared (Manifest.cache_bytes)."""
        return self.total_bytes + self.shared_bytes

    @property
    def token_bytes(self) -> int:
        """A token's routed experts' bytes: per MoE layer, its top-k (the widest routing the
        trace recorded for it) at the layer's mean expert size."""
        top_k = {}
        for step in self.steps:
            for layer, r in step.items():
                top_k[layer] = max(top_k.get(layer, 0), r.indices.shape[1])
        sizes = {}
        for (layer, _), nbytes in self.expert_bytes.items():
            sizes.setdefault(layer, []).append(nbytes)
        return sum(k * sum(sizes[layer]) // len(sizes[layer]) for layer, k in top_k.items() if layer in sizes)

    def validate(self) -> "RoutingTrace":
        """Check internal consistency; raise TraceError naming the first problem. Returns self."""
        if len(self.n_experts) != self.n_layers:
            raise TraceError(f"n_experts has {len(self.n_experts)} entries for {self.n_layers} layers")
        for (layer, expert), nbytes in self.expert_bytes.items():
            if not (0 <= layer < self.n_layers and 0 <= expert < self.n_experts[layer]):
                raise TraceError(f"expert_bytes names expert {(layer, expert)}, which the trace's layers do not have")
            if nbytes <= 0:
                raise TraceError(f"expert {(layer, expert)} has {nbytes} bytes; sizes must be positive")
        for s, step in enumerate(self.steps):
            for layer, r in step.items():
                where = f"step {s}, layer {layer}"
                if not (0 <= layer < self.n_layers and self.n_experts[layer] > 0):
                    raise TraceError(f"{where}: not an MoE layer of this trace")
                if r.indices.ndim != 2 or r.weights.shape != r.indices.shape:
                    raise TraceError(f"{where}: indices {r.indices.shape} and weights {r.weights.shape} "
                                     "must be the same (tokens, k) shape")
                for name, ids in (("indices", r.indices), ("predicted", r.predicted)):
                    if ids is None:
                        continue
                    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
                        raise TraceError(f"{where}: {name} must be a 2-d integer array, got {ids.dtype}{ids.shape}")
                    if ids.size and (ids.min() < 0 or ids.max() >= self.n_experts[layer]):
                        raise TraceError(f"{where}: {name} outside [0, {self.n_experts[layer]})")
                missing = [e for e in r.experts() if (layer, e) not in self.expert_bytes]
                if missing:
                    raise TraceError(f"{where}: no size recorded for expert(s) {missing}")
        return self

    # --- file I/O ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one compressed .npz. Records are flattened so the file has a fixed handful of
        arrays however long the run: record r is (step[r], layer[r]) with an indices/weights
        block of shape[r] and a predicted block of pred_shape[r] ((-1, -1) when absent)."""
        self.validate()
        records = [(s, layer, r) for s, step in enumerate(self.steps) for layer, r in step.items()]
        header = {"format": FORMAT, "version": FORMAT_VERSION, "n_layers": self.n_layers,
                  "n_experts": [int(n) for n in self.n_experts], "n_steps": len(self.steps),
                  "shared_bytes": int(self.shared_bytes),
                  "expert_bytes": [[int(l), int(e), int(b)] for (l, e), b in sorted(self.expert_bytes.items())]}
        arrays = dict(
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            step=np.array([s for s, _, _ in records], dtype=np.int64),
            layer=np.array([l for _, l, _ in records], dtype=np.int64),
            shape=np.array([r.indices.shape for _, _, r in records], dtype=np.int64).reshape(-1, 2),
            indices=_flat([r.indices for _, _, r in records], np.int32),
            weights=_flat([r.weights for _, _, r in records], np.float32),
            pred_shape=np.array([(-1, -1) if r.predicted is None else r.predicted.shape for _, _, r in records],
                                dtype=np.int64).reshape(-1, 2),
            predicted=_flat([r.predicted for _, _, r in records if r.predicted is not None], np.int32),
        )
        with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a bare name
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read and validate a trace written by `save`; anything else raises TraceError."""
        try:
            z = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a trace"
            raise TraceError(f"{path}: not a routing trace file ({type(e).__name__}: {e})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise TraceError(f"{path}: not a routing trace file (a single .npy array, not an .npz)")
        try:
            with z:
                arrays = {name: z[name] for name in z.files}
        except Exception as e:  # noqa: BLE001 - a corrupt member (bad zip, bad zlib stream, bad header)
            raise TraceError(f"{path}: corrupt routing trace file ({type(e).__name__}: {e})") from None
        try:
            return _from_arrays(arrays)
        except TraceError as e:
            raise TraceError(f"{path}: {e}") from None


def _from_arrays(a: dict[str, np.ndarray]) -> RoutingTrace:
    needed = ("header", "step", "layer", "shape", "indices", "weights", "pred_shape", "predicted")
    missing = [n for n in needed if n not in a]
    if missing:
        raise TraceError(f"missing array(s) {missing}")
    try:
        h = json.loads(a["header"].astype(np.uint8).tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise TraceError(f"header is not JSON ({e})") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise TraceError(f"header does not name format {FORMAT!r}")
    if h.get("version") != FORMAT_VERSION:
        raise TraceError(f"format version {h.get('version')!r}; this reader supports {FORMAT_VERSION}")
    try:
        n_layers, n_steps = int(h["n_layers"]), int(h["n_steps"])
        n_experts = [int(n) for n in h["n_experts"]]
        expert_bytes = {(int(l), int(e)): int(b) for l, e, b in h["expert_bytes"]}
        shared_bytes = int(h.get("shared_bytes", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"bad header field ({type(e).__name__}: {e})") from None
    if shared_bytes < 0:
        raise TraceError(f"shared_bytes is {shared_bytes}")

    if n_steps < 0:
        raise TraceError(f"n_steps is {n_steps}")
    for name, kind in (("step", "iu"), ("layer", "iu"), ("shape", "iu"), ("pred_shape", "iu"),
                       ("indices", "iu"), ("predicted", "iu"), ("weights", "f")):
        if a[name].dtype.kind not in kind:
            raise TraceError(f"array {name!r} has dtype {a[name].dtype}")
    step, layer, shape, pred_shape = a["step"], a["layer"], a["shape"], a["pred_shape"]
    n = step.shape[0] if step.ndim else -1
    if not (step.ndim == 1 and layer.shape == (n,) and shape.shape == (n, 2) and pred_shape.shape == (n, 2)):
        raise TraceError("record arrays step/layer/shape/pred_shape disagree in length")
    if n and (step.min() < 0 or step.max() >= n_steps or np.any(np.diff(step) < 0)):
        raise TraceError("record steps must be ascending and within n_steps")
    has_pred = pred_shape[:, 0] >= 0
    if np.any(pred_shape[has_pred] < 0) or np.any(pred_shape[~has_pred] != -1):
        raise TraceError("pred_shape rows must be a (tokens, k) shape or (-1, -1)")
    rows = shape.prod(axis=1)
    prows = np.where(has_pred, pred_shape.prod(axis=1), 0)
    if np.any(shape < 0) or rows.sum() != a["indices"].size or a["weights"].size != a["indices"].size:
        raise TraceError("indices/weights sizes do not match the record shapes")
    if prows.sum() != a["predicted"].size:
        raise TraceError("predicted size does not match the record pred_shapes")

    steps: list[Step] = [{} for _ in range(n_steps)]
    max_id = max(n_experts, default=0)
    ends, pends = np.cumsum(rows), np.cumsum(prows)
    for r in range(n):
        lo, plo = ends[r] - rows[r], pends[r] - prows[r]
        s, l = int(step[r]), int(layer[r])
        if l in steps[s]:
            raise TraceError(f"step {s} records layer {l} twice")
        pred = None if pred_shape[r, 0] < 0 else a["predicted"][plo:pends[r]].reshape(pred_shape[r])
        steps[s][l] = LayerRouting(_ids(a["indices"][lo:ends[r]].reshape(shape[r]), max_id),
                                   a["weights"][lo:ends[r]].reshape(shape[r]).astype(np.float32),
                                   None if pred is None else _ids(pred, max_id))
    return RoutingTrace(n_layers, n_experts, expert_bytes, steps, shared_bytes).validate()


def _flat(parts, dtype) -> np.ndarray:
    return np.concatenate([np.ravel(p).astype(dtype) for p in parts] or [np.zeros(0, dtype)])


def _ids(array, n_experts: int) -> np.ndarray:
    """Expert ids as int16 when every id fits (int32 beyond 32767 experts); raises TraceError on
    ids the narrow type cannot hold exactly (a cast would wrap them into valid-looking ids)."""
    array = np.asarray(array)
    ids = array.astype(np.int16 if n_experts <= np.iinfo(np.int16).max else np.int32)
    if not np.array_equal(ids, array):
        raise TraceError(f"expert ids must be integers below {n_experts}, got {array.dtype} values "
                         f"in [{array.min()}, {array.max()}]")
    return ids


def accesses(trace: RoutingTrace) -> list[Key]:
    """The demand access sequence the runtime performs: per step, per layer in the order it ran,
    the distinct experts any token selected, ascending (as `MoEModel.moe_layer` fetches them)."""
    return [(layer, e) for step in trace.steps for layer, r in step.items() for e in r.experts()]


class TraceRecorder:
    """Collects a trace from the runtime's hot path: `record` per MoE layer, `end_step` per call.

    Thread-safe (one lock; the arrays are copied outside it). Steps are not attributed to
    threads, so record concurrent forward calls with separate recorders. A layer recorded twice
    in one step starts a new step, so a call that failed before `end_step` cannot merge with the
    next one.
    """

    def __init__(self, n_experts: list[int], expert_bytes: dict[Key, int], shared_bytes: int = 0):
        self.n_experts = list(n_experts)
        self.expert_bytes = dict(expert_bytes)
        self.shared_bytes = shared_bytes
        self._max_id = max(self.n_experts, default=0)
        self._steps: list[Step] = []
        self._current: Step = {}
        self._lock = threading.Lock()

    @classmethod
    def for_manifest(cls, manifest) -> "TraceRecorder":
        """A recorder for an artifact's routed experts (`moetvm.artifact.Manifest`, duck-typed so
        this module keeps to numpy + stdlib). Shared experts are not routed: only their bytes count
        (they take their part of the cache budget)."""
        layers = manifest.moe_layers
        n_experts = [0] * (max((l.layer for l in layers), default=-1) + 1)
        for l in layers:
            n_experts[l.layer] = l.router.n_experts  # pruned experts keep their ids
        return cls(n_experts, {(l.layer, e.index): e.weight_bytes for l in layers for e in l.experts},
                   sum(s.expert.weight_bytes for l in layers for s in l.shared))

    def record(self, layer: int, indices, weights, predicted=None) -> None:
        indices = np.asarray(indices)
        routing = LayerRouting(_ids(indices, self._max_id), np.array(weights, dtype=np.float32),
                               None if predicted is None else _ids(predicted, self._max_id))
        if routing.indices.ndim != 2 or routing.weights.shape != routing.indices.shape:
            raise ValueError(f"layer {layer}: indices {indices.shape} and weights {routing.weights.shape} "
                             "must both be (tokens, k)")
        with self._lock:
            if layer in self._current:
                self._steps.append(self._current)
                self._current = {}
            self._current[layer] = routing

    def end_step(self) -> None:
        with self._lock:
            if self._current:
                self._steps.append(self._current)
                self._current = {}

    def to_trace(self) -> RoutingTrace:
        """The completed steps (not a step still being recorded), validated."""
        with self._lock:
            steps = list(self._steps)
        return RoutingTrace(len(self.n_experts), list(self.n_experts), dict(self.expert_bytes), steps,
                            self.shared_bytes).validate()
