"""The KV-cached LM protocol the compiler exports, shared by the reference model and the
transformers wrapper (compiler/models/hf.py)."""

from __future__ import annotations

import torch
from torch import nn

from moetvm.artifact import kv_shapes


class KVCachedLM(nn.Module):
    """Subclasses define `kv_layout` ((layers, heads, head_dim), or (layers, key heads, key dim,
    value heads, value dim)) and `step(tokens, positions, past_positions, past_keys, past_values)
    -> (logits, keys, values)`; `forward` is one step over whole sequences from an empty cache.
    Those with `in_place_kv` also take, with `past_values` None, in-place cache layers as
    `past_keys` (compiler/kv_cache.py) and attend through them; they name their `query_heads`
    (the in-place cache is laid out for the attention kernel's key block, compiler/attention.py)."""

    in_place_kv = False
    # Weights left in the checkpoint (compiler/checkpoint.py), read one at a time by the compiler;
    # running such a module computes with zeros.
    streamed = False

    def forward(self, tokens):
        b, s = tokens.shape
        positions = torch.arange(s).expand(b, s)
        layers, (key_heads, key_dim), (value_heads, value_dim) = kv_shapes(self.kv_layout)
        dtype = next(self.parameters()).dtype
        keys = [torch.zeros(b, key_heads, 0, key_dim, dtype=dtype)] * layers
        values = [torch.zeros(b, value_heads, 0, value_dim, dtype=dtype)] * layers
        return self.step(tokens, positions, positions[:, :0], keys, values)[0]
