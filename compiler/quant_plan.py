"""`--quant auto`: choose a precision per expert from a calibration run, under a byte budget.

Calibration runs the PyTorch model on sample tokens and records, for every MoE layer, the inputs
each expert actually receives and their routing weights. An expert's *damage* at a precision is
the routing-weighted squared error its output would carry:
    damage(e, q) = sum over tokens routed to e of  w_t^2 * ||f_q(x_t) - f(x_t)||^2
so rarely used experts (few tokens) and robust ones (small error) cost little. Starting from the
cheapest precision for every expert, the planner repeatedly buys the upgrade with the largest
damage reduction per extra byte that still fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .spec import MoELayerSpec

LADDER = ("int4", "int8", "fp16", "fp32")


@dataclass
class LayerCalibration:
    inputs: np.ndarray  # (tokens, d_model) inputs to the MoE layer
    indices: np.ndarray  # (tokens, k) selected experts
    weights: np.ndarray  # (tokens, k) routing weights


def calibrate(model: torch.nn.Module, specs: list[MoELayerSpec], tokens: np.ndarray) -> list[LayerCalibration]:
    """Run `model` on token windows (batch, seq) and capture every MoE layer's inputs."""
    from moetvm.routing import select_experts

    captured: dict[int, list] = {i: [] for i in range(len(specs))}
    hooks = []
    for i, spec in enumerate(specs):
        module = model.get_submodule(spec.path)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, i=i: captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy())))
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.asarray(tokens, np.int64)))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, spec in enumerate(specs):
        x = np.concatenate(captured[i])
        logits = x @ spec.router_weight.T + (0 if spec.router_bias is None else spec.router_bias)
        scores = {"softmax": _softmax, "sigmoid": lambda z: 1 / (1 + np.exp(-z)), "sparsemixer": lambda z: z}[spec.score_fn](logits)
        idx, w = select_experts(scores.astype(np.float32), spec.router())
        out.append(LayerCalibration(x, idx, w))
    return out


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _swiglu(x, w):
    """An expert's output (NumPy reference, either kind: the clamped one has biases)."""
    if "w_gate" in w and "b_gate" not in w:
        g = x @ w["w_gate"]
        return (g / (1 + np.exp(-g)) * (x @ w["w_up"])) @ w["w_down"]
    raise quant.QuantizationError("--quant auto plans SwiGLU experts only")


def _dequantized(weights: dict, s: quant.Scheme) -> dict:
    stored = quant.quantize_expert(weights, s)
    return {p: quant.dequantize({k[len(p):]: v for k, v in stored.items() if k == p or k.startswith(p + ".")}, s)
            for p in weights}


def plan(specs: list[MoELayerSpec], calibration: list[LayerCalibration], budget_bytes: int,
         group_size: int = quant.DEFAULT_GROUP_SIZE, int4_symmetric: bool = False) -> dict[tuple[int, int], quant.Scheme]:
    """Precision per (layer, expert) minimising total damage within `budget_bytes`."""
    ladder = [quant.scheme(name, group_size, int4_symmetric) for name in LADDER]
    options = {}  # (layer, expert) -> [(bytes, damage) per ladder step]
    for li, (spec, cal) in enumerate(zip(specs, calibration)):
        for ei, expert in enumerate(spec.experts):
            weights = quant.kernel_layout(expert.w_gate, expert.w_up, expert.w_down, expert.biases, expert.kind)
            rows, slots = np.nonzero(cal.indices == ei)
            x, w = cal.inputs[rows], cal.weights[rows, slots]
            exact = _swiglu(x, weights) if len(rows) else None
            steps = []
            for s in ladder:
                size = quant.nbytes(quant.quantize_expert(weights, s))
                damage = 0.0 if exact is None or s.name == "fp32" else float(
                    ((w[:, None] * (_swiglu(x, _dequantized(weights, s)) - exact)) ** 2).sum())
                steps.append((size, damage))
            options[(li, ei)] = steps
    level = {key: 0 for key in options}
    used = sum(options[key][0][0] for key in options)
    if used > budget_bytes:
        raise quant.QuantizationError(
            f"weight budget {budget_bytes} bytes is below the all-{LADDER[0]} size of {used} bytes")
    while True:
        best, best_value = None, 0.0
        for key, lv in level.items():
            if lv + 1 >= len(ladder):
                continue
            (size0, dmg0), (size1, dmg1) = options[key][lv], options[key][lv + 1]
            extra = size1 - size0
            if used + extra > budget_bytes or dmg0 <= dmg1:
                continue
            value = (dmg0 - dmg1) / extra
            if value > best_value:
                best, best_value = key, value
        if best is None:
            break
        used += options[best][level[best] + 1][0] - options[best][level[best]][0]
        level[best] += 1
    return {key: ladder[lv] for key, lv in level.items()}
