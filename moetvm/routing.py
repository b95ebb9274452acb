"""Routing: from router scores to each token's experts and weights, and tokens grouped by expert.

Part of the artifact's contract (what a `Router` entry means), so it lives beside the schema:
the runtime's hot path and the compiler's calibration use this one implementation.
"""

from __future__ import annotations

import numpy as np

from moetvm.artifact import Router


def select_experts(scores: np.ndarray, router: Router) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (tokens, top_k), from scores (tokens, n_experts).

    Scores already carry the score function (softmax or sigmoid). Selection may add a bias and
    restrict to the best groups (DeepSeek-V3); the weights always come from the unbiased scores.
    """
    choice = scores if router.selection_bias is None else scores + np.asarray(router.selection_bias, scores.dtype)
    if router.n_groups > 1:
        tokens, n = choice.shape
        grouped = choice.reshape(tokens, router.n_groups, n // router.n_groups)
        # A group's score is the sum of its two best experts (DeepSeek-V3's rule).
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


def group_by_expert(indices: np.ndarray, weights: np.ndarray):
    """Yield (expert, token rows, their weights) for each selected expert, in expert order."""
    flat = indices.ravel()
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [len(flat)]
    k = indices.shape[1]
    for expert, lo, hi in zip(experts, starts, bounds):
        slots = order[lo:hi]
        yield int(expert), slots // k, weights.ravel()[slots]
