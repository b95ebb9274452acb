"""Layers that carry a fixed-size state between steps (artifact.LayerState), at export.

LFM2's short convolution is a causal depthwise convolution over the sequence: a decode step needs
the last kernel - 1 inputs of the layer, not its whole past. The runtime owns one state buffer
(batch, kernel - 1, channels) per such layer, passed to every step like the KV buffers; the layer
is traced as one opaque op, `moetvm::short_conv(x, weight, state, past_positions)`, which the
importer lowers (`convert_short_conv`) to one kernel that convolves the step's inputs after the
state and writes the new state in place (`call_tir_inplace`). At past length 0 the state is read
as zeros, so a buffer never needs clearing between sequences.
"""

from __future__ import annotations

import functools

import torch
from tvm import relax
from tvm.script import tirx as T


@torch.library.custom_op("moetvm::short_conv", mutates_args=())
def _short_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, past_positions: torch.Tensor) -> torch.Tensor:
    """Eager semantics of the op (for tests and probes): x (b, s, c) after the state (b, k - 1, c)
    (zeros at past length 0), convolved causally with weight (c, k): out (b, s, c); the state
    becomes the last k - 1 inputs."""
    k, s = weight.shape[1], x.shape[1]
    past = state if past_positions.shape[1] > 0 else torch.zeros_like(state)
    window = torch.cat([past, x.to(state.dtype)], dim=1)  # (b, k - 1 + s, c)
    out = sum(window[:, j:j + s] * weight[:, j] for j in range(k))
    state.copy_(window[:, s:])
    return out


@_short_conv.register_fake
def _(x, weight, state, past_positions):
    return x.new_empty(x.shape)


class ConvState:
    """One short-convolution layer's state buffer while exporting (or running the op eagerly)."""

    def __init__(self, buffer: torch.Tensor, past_positions: torch.Tensor):
        self.buffer, self.past_positions = buffer, past_positions

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (b, s, c), depthwise weight (c, k) -> (b, s, c), the state advanced by s inputs."""
        return torch.ops.moetvm.short_conv(x, weight, self.buffer, self.past_positions)


def convert_short_conv(node, importer):
    """torch.export node -> Relax: one kernel writes the output and, in place, the new state."""
    x, weight, state, past_positions = (importer.env[a] for a in node.args[:4])
    bb = importer.block_builder
    channels, kernel = (int(d) for d in weight.ty.shape.values)
    p = relax.prim_value(past_positions.ty.shape.values[1])
    func = bb.add_func(short_conv_kernel(channels, kernel), "short_conv")
    both = bb.emit(relax.call_tir_inplace(func, [x, weight, state, p], [2, -1], [state.ty, x.ty]))
    return bb.emit(relax.TupleGetItem(both, 1))


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def short_conv_kernel(channels: int, kernel: int):
    """out[t, c] = sum_j weight[c, j] * window[t + j, c] over window = state ++ x; then the state
    <- the window's last kernel - 1 rows. Rows are read in rising order and row m of the new
    state comes from row s + m > m of the window, so the state is overwritten only after it is read."""
    held = kernel - 1

    @T.prim_func(private=True)
    def short_conv(x_h: T.handle, w_h: T.handle, state_h: T.handle, p: T.int64, out_h: T.handle):
        # Opaque: the state is rewritten from rows the output also reads; nothing may fuse into it.
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        b, s = T.int64(), T.int64()
        x = T.match_buffer(x_h, (b, s, channels), "float32")
        w = T.match_buffer(w_h, (channels, kernel), "float32")
        state = T.match_buffer(state_h, (b, held, channels), "float32")
        out = T.match_buffer(out_h, (b, s, channels), "float32")
        for bi in T.serial(b):
            for t in T.serial(s):
                for c in T.serial(channels):
                    out[bi, t, c] = T.float32(0)
                    for j in T.serial(kernel):
                        # window row t + j: the state's (zeros at past 0) before row `held`, x after
                        out[bi, t, c] = out[bi, t, c] + w[c, j] * T.if_then_else(
                            t + j >= held, x[bi, T.max(t + j - held, 0), c],
                            T.if_then_else(p > 0, state[bi, T.min(t + j, held - 1), c], T.float32(0)))
            for m in T.serial(held):
                for c in T.serial(channels):
                    state[bi, m, c] = T.if_then_else(
                        s + m >= held, x[bi, T.max(s + m - held, 0), c],
                        T.if_then_else(p > 0, state[bi, T.min(s + m, held - 1), c], T.float32(0)))

    return short_conv
