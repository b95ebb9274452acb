"""Routing: from router scores (or a fixed pattern) to each token's experts and weights, and
tokens grouped by expert.

What a `Router` entry means, computed: its vocabulary (ROUTING_MODES) and checks are the
schema's (artifact.py); the runtime's hot path and the compiler's calibration use this one
implementation.

Modes:
  learned  the model's router: scores -> (optionally biased, grouped) top-k -> weights.
  hash     expert set looked up by the token id (`table[token]`), weights 1/k: no router runs.
  tiling   expert set by position: positions [b*tile, (b+1)*tile) use allowed experts
           b*k .. b*k+k-1 (mod the number allowed), weights 1/k.
  cycle    expert set by time step t: `cycle[t % len(cycle)]`, weights 1/k.
Masked experts are never selected: learned routing gives their traffic to each token's
next-best allowed expert; fixed patterns are built over the allowed experts only.
"""

from __future__ import annotations

import numpy as np

from moetvm.artifact import FIXED_MODES, Router

def allowed_experts(router: Router) -> np.ndarray:
    return np.array(sorted(set(range(router.n_experts)) - set(router.masked)), dtype=np.int64)


class FixedPattern:
    """A fixed-pattern router's tables as arrays, built once per loaded model (the manifest keeps
    them as JSON lists)."""

    def __init__(self, router: Router):
        if router.mode not in FIXED_MODES:
            raise ValueError(f"routing mode {router.mode!r} is not a fixed pattern")
        self.mode, self.k, self.tile = router.mode, router.top_k, router.tile
        self.allowed = allowed_experts(router)
        self.sets = np.asarray(router.table if router.mode == "hash" else router.cycle or [[0] * self.k], np.int64)
        self.weight = np.float32(router.scaling / router.top_k)

    def experts(self, tokens: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
        """(n, k) experts for tokens at `positions` (flattened)."""
        if self.mode == "hash":
            if tokens is None:
                raise ValueError("hash routing needs the token ids")
            return self.sets[tokens]
        if self.mode == "tiling":
            block = positions // self.tile
            return self.allowed[(block[:, None] * self.k + np.arange(self.k)) % len(self.allowed)]
        return self.sets[positions % len(self.sets)]


def route(router: Router, scores: np.ndarray | None, tokens: np.ndarray | None, positions: np.ndarray,
          pattern: FixedPattern | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (n, top_k), for any routing mode (`pattern`: the router's
    prebuilt FixedPattern, to avoid rebuilding its tables on every call)."""
    if router.mode == "learned":
        return select_experts(scores, router)
    pattern = pattern or FixedPattern(router)
    indices = pattern.experts(tokens, positions)
    return indices, np.full(indices.shape, pattern.weight, dtype=np.float32)


def select_experts(scores: np.ndarray, router: Router) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (tokens, top_k), from scores (tokens, n_experts).

    Scores already carry the score function (softmax or sigmoid). Selection may add a bias and
    restrict to the best groups (DeepSeek-V3); the weights always come from the unbiased scores.
    Sparsemixer routers give their logits: see `sparsemixer`.
    """
    if router.score_fn == "sparsemixer":
        return sparsemixer(scores, router)
    choice = scores if router.selection_bias is None else scores + np.asarray(router.selection_bias, scores.dtype)
    if router.masked:
        choice = choice.copy()
        choice[:, router.masked] = -np.inf
    if router.n_groups > 1:
        tokens, n = choice.shape
        grouped = choice.reshape(tokens, router.n_groups, n // router.n_groups)
        # A group's score: the sum of its two best experts (DeepSeek-V3) or its best one (DeepSeek-V2).
        if router.group_score == "max":
            group_score = grouped.max(-1)
        else:
            group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, : router.top_groups]
        mask = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, n // router.n_groups, axis=-1), choice, -np.inf)
    indices = np.argsort(-choice, axis=-1, kind="stable")[:, : router.top_k]
    weights = np.take_along_axis(scores, indices, axis=-1)
    if router.normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return indices, (weights * router.scaling).astype(scores.dtype, copy=False)


def sparsemixer(logits: np.ndarray, router: Router) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's sparsemixer as transformers runs it at inference: the best expert, then the best
    of the rest; each weighted by a softmax of the logits over the experts within 2 jitter_eps
    of it (relative: (pick - logit) / max(|logit|, pick)), the first one's over all experts, the
    second one's with the first left out. Not renormalised."""
    s = np.array(logits, np.float32)
    if router.masked:
        s[:, router.masked] = -np.inf
    rows = np.arange(s.shape[0])
    indices, weights = [], []
    candidates = s
    for _ in range(2):
        pick = np.argmax(candidates, axis=-1)
        best = candidates[rows, pick][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 and inf/inf are NaN: kept, as in torch
            far = (best - s) / np.maximum(np.abs(s), best) > 2 * router.jitter_eps
        gates = np.where(far, -np.inf, candidates)
        gates = np.exp(gates - best)
        weights.append(gates[rows, pick] / gates.sum(-1))
        indices.append(pick)
        candidates = candidates.copy()
        candidates[rows, pick] = -np.inf
    return (np.stack(indices, -1), (np.stack(weights, -1) * router.scaling).astype(np.float32))


SKIPPED = -1  # the index of a selected expert that skip_light_experts dropped


def skip_light_experts(indices: np.ndarray, weights: np.ndarray, min_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence-based skipping: each token drops the selected experts whose share of its routing
    weight is below `min_weight` (its heaviest always stays), and the rest are rescaled to the
    same total. Dropped slots get index SKIPPED and weight 0."""
    total = weights.sum(1, keepdims=True)
    share = weights / np.where(total > 0, total, 1)
    keep = share >= min_weight
    keep[np.arange(len(weights)), share.argmax(1)] = True
    kept = np.where(keep, weights, 0).astype(weights.dtype)
    scale = np.divide(total, kept.sum(1, keepdims=True), out=np.ones_like(total), where=kept.sum(1, keepdims=True) > 0)
    return np.where(keep, indices, SKIPPED), (kept * scale).astype(weights.dtype, copy=False)


def group_by_expert(indices: np.ndarray, weights: np.ndarray):
    """Yield (expert, token rows, their weights) for each selected expert, in expert order
    (skipped slots left out)."""
    flat = indices.ravel()
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [len(flat)]
    k = indices.shape[1]
    for expert, lo, hi in zip(experts, starts, bounds):
        if expert == SKIPPED:
            continue
        slots = order[lo:hi]
        yield int(expert), slots // k, weights.ravel()[slots]
