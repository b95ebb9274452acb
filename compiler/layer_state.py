"""Layers that carry a fixed-size state between steps (artifact.LayerState), at export.

The runtime owns one buffer per state, passed to every step like the KV buffers; each kind is
traced as one opaque op that reads the state and writes the new one in place, which the importer
lowers to one kernel (`call_tir_inplace`). At past length 0 a state is read as zeros, so a buffer
never needs clearing between sequences.
  conv: a causal depthwise convolution over the sequence (LFM2's short convolutions, Mamba2's
        input convolution) needs the last kernel - 1 inputs, not the whole past: state (batch,
        kernel - 1, channels); `moetvm::short_conv(x, weight, state, past_positions)`.
  ssm:  Mamba2's selective scan (state space duality): per head h, position t, with
        dt = softplus(dt_t + dt_bias[h]), state <- exp(dt A[h]) state + dt x_t B_t^T and
        y_t = state C_t + D[h] x_t; state (batch, heads, head_dim, state_size);
        `moetvm::ssm_scan(x, dt, A, B, C, D, dt_bias, state, past_positions)`. transformers
        runs prefill as a chunked scan; this is the same recurrence, one position at a time.
  delta: the gated delta rule (Qwen3-Next, Qwen3.5's linear attention): per value head h, with
        decay exp(g_t) and write strength beta_t, the memory S (value_dim x key_dim) becomes
        S exp(g_t), then S += beta_t (v_t - S k_t) k_t^T, and o_t = S q_t (q, k l2-normalised
        before, q scaled by key_dim^-1/2); state (batch, value heads, value_dim, key_dim);
        `moetvm::delta_rule(q, k, v, g, beta, state, past_positions)`. Again transformers'
        prefill is chunked and this is its recurrent form.
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


class StateHolder:
    """One layer's state buffer while exporting (or running its op eagerly), with the positions
    the step's past holds (the op reads the state as zeros at past length 0)."""

    def __init__(self, buffer: torch.Tensor, past_positions: torch.Tensor):
        self.buffer, self.past_positions = buffer, past_positions


class ConvState(StateHolder):
    """A short convolution's state (LFM2, the input convolution of Mamba2 and gated delta nets)."""

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


@torch.library.custom_op("moetvm::ssm_scan", mutates_args=())
def _ssm_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
              dt_bias: torch.Tensor, state: torch.Tensor, past_positions: torch.Tensor) -> torch.Tensor:
    """Eager semantics: x (batch, s, heads, head_dim), dt (batch, s, heads), a, d, dt_bias (heads),
    b, c (batch, s, groups, state_size), state (batch, heads, head_dim, state_size) -> y like x;
    head h reads group h // (heads // groups)."""
    heads, groups = x.shape[2], b.shape[2]
    h = state if past_positions.shape[1] > 0 else torch.zeros_like(state)
    b, c = (t.repeat_interleave(heads // groups, dim=2) for t in (b, c))
    step = torch.nn.functional.softplus(dt + dt_bias)  # (batch, s, heads)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(step[:, t, :, None, None] * a[:, None, None]) * h \
            + step[:, t, :, None, None] * x[:, t, :, :, None] * b[:, t, :, None, :]
        ys.append((h * c[:, t, :, None, :]).sum(-1) + d[:, None] * x[:, t])
    state.copy_(h)
    return torch.stack(ys, dim=1)


@_ssm_scan.register_fake
def _(x, dt, a, b, c, d, dt_bias, state, past_positions):
    return x.new_empty(x.shape)


class SSMState(StateHolder):
    """A Mamba2 layer's scan state."""

    def scan(self, x, dt, a, b, c, d, dt_bias) -> torch.Tensor:
        return torch.ops.moetvm.ssm_scan(x, dt, a, b, c, d, dt_bias, self.buffer, self.past_positions)


def convert_ssm_scan(node, importer):
    """torch.export node -> Relax: one kernel writes y and, in place, the new state."""
    x, dt, a, b, c, d, dt_bias, state, past_positions = (importer.env[arg] for arg in node.args[:9])
    bb = importer.block_builder
    heads, head_dim, state_size = (int(v) for v in state.ty.shape.values[1:])
    groups = int(b.ty.shape.values[2])
    p = relax.prim_value(past_positions.ty.shape.values[1])
    func = bb.add_func(ssm_scan_kernel(heads, head_dim, groups, state_size), "ssm_scan")
    both = bb.emit(relax.call_tir_inplace(func, [x, dt, a, b, c, d, dt_bias, state, p], [7, -1], [state.ty, x.ty]))
    return bb.emit(relax.TupleGetItem(both, 1))


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def ssm_scan_kernel(heads: int, head_dim: int, groups: int, state_size: int):
    """The recurrence of `_ssm_scan`, per (batch, head) in parallel: each state row (state_size
    lanes) stays in registers over the step's positions and is written back once."""
    per_group = heads // groups

    @T.prim_func(private=True)
    def ssm_scan(x_h: T.handle, dt_h: T.handle, a_h: T.handle, b_h: T.handle, c_h: T.handle, d_h: T.handle,
                 bias_h: T.handle, state_h: T.handle, p: T.int64, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, s = T.int64(), T.int64()
        x = T.match_buffer(x_h, (batch, s, heads, head_dim), "float32")
        dt = T.match_buffer(dt_h, (batch, s, heads), "float32")
        a = T.match_buffer(a_h, (heads,), "float32")
        b = T.match_buffer(b_h, (batch, s, groups, state_size), "float32")
        c = T.match_buffer(c_h, (batch, s, groups, state_size), "float32")
        d = T.match_buffer(d_h, (heads,), "float32")
        bias = T.match_buffer(bias_h, (heads,), "float32")
        state = T.match_buffer(state_h, (batch, heads, head_dim, state_size), "float32")
        y = T.match_buffer(y_h, (batch, s, heads, head_dim), "float32")
        for bh in T.parallel(batch * heads):
            if True:
                row = T.decl_buffer((state_size,), "float32", scope="local")
                acc = T.decl_buffer((1,), "float32", scope="local")
                bi: T.let[T.int64] = bh // heads
                h: T.let[T.int64] = bh % heads
                g: T.let[T.int64] = h // per_group
                for i in T.serial(head_dim):
                    for n in T.serial(state_size):
                        row[n] = T.if_then_else(p > 0, state[bi, h, i, n], T.float32(0))
                    for t in T.serial(s):
                        raw: T.let[T.float32] = dt[bi, t, h] + bias[h]
                        # softplus as torch computes it (linear above 20)
                        step: T.let[T.float32] = T.if_then_else(raw > T.float32(20), raw, T.log1p(T.exp(raw)))
                        decay: T.let[T.float32] = T.exp(step * a[h])
                        acc[0] = T.float32(0)
                        for n in T.serial(state_size):
                            row[n] = row[n] * decay + step * x[bi, t, h, i] * b[bi, t, g, n]
                            acc[0] = acc[0] + row[n] * c[bi, t, g, n]
                        y[bi, t, h, i] = acc[0] + d[h] * x[bi, t, h, i]
                    for n in T.serial(state_size):
                        state[bi, h, i, n] = row[n]

    return ssm_scan


@torch.library.custom_op("moetvm::delta_rule", mutates_args=())
def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                state: torch.Tensor, past_positions: torch.Tensor) -> torch.Tensor:
    """Eager semantics: q, k (batch, s, key_heads, key_dim) normalised and scaled already, v
    (batch, s, value_heads, value_dim), g, beta (batch, s, value_heads), state (batch, value_heads,
    value_dim, key_dim) -> out like v; value head h reads key head h // (value_heads // key_heads)."""
    value_heads, key_heads = v.shape[2], k.shape[2]
    memory = state if past_positions.shape[1] > 0 else torch.zeros_like(state)
    q, k = (t.repeat_interleave(value_heads // key_heads, dim=2) for t in (q, k))
    outs = []
    for t in range(v.shape[1]):
        memory = memory * torch.exp(g[:, t, :, None, None])
        recalled = (memory * k[:, t, :, None, :]).sum(-1)  # (batch, heads, value_dim)
        delta = (v[:, t] - recalled) * beta[:, t, :, None]
        memory = memory + delta[..., None] * k[:, t, :, None, :]
        outs.append((memory * q[:, t, :, None, :]).sum(-1))
    state.copy_(memory)
    return torch.stack(outs, dim=1)


@_delta_rule.register_fake
def _(q, k, v, g, beta, state, past_positions):
    return v.new_empty(v.shape)


class DeltaState(StateHolder):
    """A gated delta net's memory."""

    def update(self, q, k, v, g, beta) -> torch.Tensor:
        return torch.ops.moetvm.delta_rule(q, k, v, g, beta, self.buffer, self.past_positions)


def convert_delta_rule(node, importer):
    """torch.export node -> Relax: one kernel writes the output and, in place, the new memory."""
    q, k, v, g, beta, state, past_positions = (importer.env[arg] for arg in node.args[:7])
    bb = importer.block_builder
    value_heads, value_dim, key_dim = (int(d) for d in state.ty.shape.values[1:])
    key_heads = int(k.ty.shape.values[2])
    p = relax.prim_value(past_positions.ty.shape.values[1])
    func = bb.add_func(delta_rule_kernel(key_heads, value_heads, key_dim, value_dim), "delta_rule")
    both = bb.emit(relax.call_tir_inplace(func, [q, k, v, g, beta, state, p], [5, -1], [state.ty, v.ty]))
    return bb.emit(relax.TupleGetItem(both, 1))


@functools.lru_cache(maxsize=None)  # one parse per kernel: TVMScript parsing costs ~0.2 s
def delta_rule_kernel(key_heads: int, value_heads: int, key_dim: int, value_dim: int):
    """The recurrence of `_delta_rule`, per (batch, value head) in parallel: each memory row (one
    value channel over key_dim lanes) is independent of the others, stays in registers over the
    step's positions and is written back once."""
    per_key = value_heads // key_heads

    @T.prim_func(private=True)
    def delta_rule(q_h: T.handle, k_h: T.handle, v_h: T.handle, g_h: T.handle, beta_h: T.handle, state_h: T.handle,
                   p: T.int64, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (batch, s, key_heads, key_dim), "float32")
        k = T.match_buffer(k_h, (batch, s, key_heads, key_dim), "float32")
        v = T.match_buffer(v_h, (batch, s, value_heads, value_dim), "float32")
        g = T.match_buffer(g_h, (batch, s, value_heads), "float32")
        beta = T.match_buffer(beta_h, (batch, s, value_heads), "float32")
        state = T.match_buffer(state_h, (batch, value_heads, value_dim, key_dim), "float32")
        out = T.match_buffer(out_h, (batch, s, value_heads, value_dim), "float32")
        for bh in T.parallel(batch * value_heads):
            if True:
                row = T.decl_buffer((key_dim,), "float32", scope="local")
                acc = T.decl_buffer((1,), "float32", scope="local")
                bi: T.let[T.int64] = bh // value_heads
                h: T.let[T.int64] = bh % value_heads
                kh: T.let[T.int64] = h // per_key
                for j in T.serial(value_dim):
                    for i in T.serial(key_dim):
                        row[i] = T.if_then_else(p > 0, state[bi, h, j, i], T.float32(0))
                    for t in T.serial(s):
                        decay: T.let[T.float32] = T.exp(g[bi, t, h])
                        acc[0] = T.float32(0)
                        for i in T.serial(key_dim):
                            row[i] = row[i] * decay
                            acc[0] = acc[0] + row[i] * k[bi, t, kh, i]
                        delta: T.let[T.float32] = (v[bi, t, h, j] - acc[0]) * beta[bi, t, h]
                        acc[0] = T.float32(0)
                        for i in T.serial(key_dim):
                            row[i] = row[i] + delta * k[bi, t, kh, i]
                            acc[0] = acc[0] + row[i] * q[bi, t, kh, i]
                        out[bi, t, h, j] = acc[0]
                    for i in T.serial(key_dim):
                        state[bi, h, j, i] = row[i]

    return delta_rule


HOLDERS = {"conv": ConvState, "ssm": SSMState, "delta": DeltaState}  # artifact.LayerState.kind -> its holder at export
