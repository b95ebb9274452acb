"""The in-place KV cache at export: what a traced model's attention becomes.

Exported with the in-place protocol, an LM step takes per layer a key buffer (batch, kv_heads,
blocks, key_dim, block) and a value buffer (batch, kv_heads, blocks, block, value_dim) that the
runtime owns (artifact.KVCacheLayout), and returns only logits. Each attention layer is traced as one opaque op,
`moetvm::cached_attention(q, k, v, key_buffer, value_buffer, past_positions, scale)`, which the
importer lowers (`convert_cached_attention`) to the kernels of compiler/attention.py: the new
keys and values written at their positions in place (`call_tir_inplace` on the step's inputs),
then attention over the first `past + seq` positions. So a decode step copies nothing of the
context's size, and nothing converts the cache between NumPy and TVM.

Models reach the op through `InPlaceLayer.attend`: the reference model calls it when its cache
argument is one, and transformers models through their attention interface (`hf_attention`,
registered under ATTENTION_NAME) with `InPlaceCache` as their cache (compiler/models/hf.py).
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import torch
from tvm import relax

from moetvm.artifact import KV_SCALE_BYTES

from . import attention as kernels

ATTENTION_NAME = "moetvm_in_place"


@torch.library.custom_op("moetvm::cached_attention", mutates_args=())
def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_buffer: torch.Tensor,
                      value_buffer: torch.Tensor, past_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager semantics of the op (for tests): write k, v at positions p..p+s-1 of the buffers and
    attend causally over positions 0..p+s-1. q (b, h, s, dk), k (b, kvh, s, dk), v (b, kvh, s, dv);
    returns (b, s, h, dv)."""
    p, s = past_positions.shape[1], q.shape[2]
    positions = torch.arange(p, p + s)
    block, offset = positions // key_buffer.shape[4], positions % key_buffer.shape[4]
    key_buffer[:, :, block, :, offset] = _stored(k, key_buffer.dtype).permute(2, 0, 1, 3)  # (s, b, kvh, dk)
    value_buffer[:, :, block, offset] = _stored(v, value_buffer.dtype)
    group = q.shape[1] // k.shape[1]
    keys = _read(_rows(key_buffer.transpose(3, 4), p + s)).transpose(2, 3).repeat_interleave(group, 1)
    values = _read(_rows(value_buffer, p + s)).repeat_interleave(group, 1)
    scores = (q @ keys) * scale
    visible = torch.arange(p + s)[None, :] <= (p + torch.arange(s))[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return (weights @ values).transpose(1, 2).contiguous()


def _rows(blocked: torch.Tensor, n: int) -> torch.Tensor:
    """(b, heads, blocks, block, d) -> the first n positions' rows (b, heads, n, d)."""
    b, heads, blocks, block, d = blocked.shape
    return blocked.reshape(b, heads, blocks * block, d)[:, :, :n]


def _stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows (..., d) as the cache stores them: cast, or for int8 quantized per row with the
    row's float32 scale in its last KV_SCALE_BYTES elements (artifact.KVCacheLayout)."""
    if dtype != torch.int8:
        return x.to(dtype)
    amax = x.float().abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.cat([torch.round(x * inv).to(torch.int8), (amax / 127).view(torch.int8)], -1)


def _read(rows: torch.Tensor) -> torch.Tensor:
    """Stored rows -> float32 (the inverse of _stored, up to its rounding)."""
    if rows.dtype != torch.int8:
        return rows.float()
    return rows[..., :-KV_SCALE_BYTES].float() * rows[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)


@_cached_attention.register_fake
def _(q, k, v, key_buffer, value_buffer, past_positions, scale):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3])


class InPlaceLayer:
    """One layer's buffers while exporting (or running the op eagerly)."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, past_positions: torch.Tensor):
        self.key_buffer, self.value_buffer, self.past_positions = key_buffer, value_buffer, past_positions

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        """q (b, heads, s, dk) with this step's k, v (b, kv_heads, s, d) -> (b, s, heads, dv)."""
        return torch.ops.moetvm.cached_attention(q, k, v, self.key_buffer, self.value_buffer, self.past_positions,
                                                 float(scale))


def convert_cached_attention(node, importer):
    """torch.export node -> Relax: append k and v into the buffers in place, then attend."""
    q, k, v, key_buffer, value_buffer, past_positions = (importer.env[a] for a in node.args[:6])
    scale = float(node.args[6])
    bb = importer.block_builder
    b, heads, s, key_dim = q.ty.shape.values
    kv_heads, value_dim = int(v.ty.shape.values[1]), int(v.ty.shape.values[3])
    heads, key_dim, dtype = int(heads), int(key_dim), str(key_buffer.ty.dtype)
    p = relax.prim_value(past_positions.ty.shape.values[1])
    # Dot order (artifact.KVCacheLayout.dot) is the one layout with 4-D value buffers, (b, kv_heads,
    # blocks, block * (value_dim + 4)), and its key buffers' last dimension is 4 bytes a position.
    dot = len(value_buffer.ty.shape.values) == 4
    blocks, block = key_buffer.ty.shape.values[2], int(key_buffer.ty.shape.values[4]) // (4 if dot else 1)
    append_k = bb.add_func(kernels.append_keys(kv_heads, key_dim, dtype, block, dot), f"kv_append_keys_{dtype}")
    append_v = bb.add_func(kernels.append_values(kv_heads, value_dim, dtype, block, dot), f"kv_append_values_{dtype}")
    attend = bb.add_func(kernels.cached_attention(heads, kv_heads, key_dim, value_dim, dtype, scale, block, dot),
                         "cached_attention")
    keys = bb.emit(relax.call_tir_inplace(append_k, [key_buffer, k, p], 0, key_buffer.ty))
    values = bb.emit(relax.call_tir_inplace(append_v, [value_buffer, v, p], 0, value_buffer.ty))
    capacity = blocks * block
    out = bb.emit(relax.call_tir(attend, [q, keys, values, p],
                                 [relax.TensorType((b, s, heads, value_dim), "float32"),
                                  relax.TensorType((b, heads, s, capacity), "float32")]))
    return bb.emit(relax.TupleGetItem(out, 0))


# --- transformers glue -------------------------------------------------------------------------
class _HFAttention:
    """A transformers attention function (AttentionInterface) over the buffers of the
    InPlaceCache in use (`using`): the causal mask follows from positions (no sliding window:
    such models keep the concatenating cache), so `attention_mask` is not read."""

    def __init__(self):
        self._cache = contextvars.ContextVar("moetvm_in_place_cache")

    @contextmanager
    def using(self, cache):
        token = self._cache.set(cache)
        try:
            yield
        finally:
            self._cache.reset(token)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if kwargs.get("sliding_window") or kwargs.get("s_aux") is not None:
            raise ValueError(f"{type(module).__name__}: windowed or sink attention needs the concatenating KV cache")
        layer = self._cache.get().layers[module.layer_idx]
        scale = scaling if scaling is not None else key.shape[-1] ** -0.5
        return layer.attend(query, key, value, scale), None


hf_attention = _HFAttention()


def in_place_cache_class():
    """transformers' DynamicCache whose layers hand the new keys and values through unchanged to
    `hf_attention`, which writes them into the buffers (made lazily: transformers is optional)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _Layer(DynamicLayer, InPlaceLayer):
        def __init__(self, key_buffer, value_buffer, past_positions):
            DynamicLayer.__init__(self)
            InPlaceLayer.__init__(self, key_buffer, value_buffer, past_positions)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.past_positions.shape[1]

    class _StateLayer(DynamicLayer):
        """A stateful layer's place in the cache (compiler/layer_state.py): its states by kind, no keys."""

        def __init__(self, states, past_positions):
            super().__init__()
            self.states, self.past_positions, self.is_initialized = states, past_positions, True

        def get_seq_length(self) -> int:
            return self.past_positions.shape[1]

    class InPlaceCache(DynamicCache):
        """Indexed by decoder layer (`n_layers` of them): the attention layers' buffers at
        `kv_layers` (in order), the stateful layers' states (`states`: decoder layer -> {kind ->
        holder}) at their own indices, and an empty place at the layers that cache nothing
        (NemotronH's MLP and MoE blocks)."""

        def __init__(self, key_buffers, value_buffers, past_positions, states, kv_layers, n_layers):
            super().__init__()
            attention = dict(zip(kv_layers, (_Layer(k, v, past_positions) for k, v in zip(key_buffers, value_buffers))))
            self.layers = [_StateLayer(states[i], past_positions) if i in states else
                           attention[i] if i in attention else _StateLayer({}, past_positions) for i in range(n_layers)]

    return InPlaceCache
