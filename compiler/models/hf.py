"""Hugging Face transformers causal LMs as compiler input.

`HFCausalLM` wraps an instantiated transformers model in the compiler's KV-cached LM protocol
(`step`, `kv_layout`), so it is exported, cut at its MoE blocks and run exactly like the reference
model. The MoE blocks themselves are read structurally by the adapters in `adapters/hf.py`;
everything else (embeddings, attention with its rotary embeddings, norms, head) is traced.

Export choices, each because the default does not survive torch.export + TVM's importer:
  * eager attention (set on the model passed in) with an explicit 4-D additive mask computed
    from positions, windowed for sliding-window layers (one mask per layer kind where a model
    mixes them): transformers' own mask builders (packed-sequence detection, symbolic `arange`)
    add ops TVM rejects, and an explicit 4-D mask is used as given;
  * the cache is a `DynamicCache` filled from the step's inputs and read back after the call,
    so the traced graph is plain `cat`s;
  * complex-number rotary embeddings (DeepSeek-V2: `polar`, `view_as_complex`) are rewritten to
    real arithmetic before import (frontend._lower_complex);
  * Llama 4's chunked layers get their own mask (same chunk of attention_chunk_size positions);
  * PhiMoE's LongRoPE picks its scale in Python by the sequence's length (`if seq_len > ...`),
    which torch.export cannot trace: the choice becomes a `where` on the positions (`_LongRopeScale`).
transformers is an optional dependency (`pip install moetvm[hf]`); nothing here imports it at
module import time.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from moetvm.artifact import KVCacheLayout, LayerState

from ..tokenizer import TokenizerSource
from .lm import KVCachedLM


class HFCausalLM(KVCachedLM):
    """A transformers `*ForCausalLM` in the compiler's KV-cached LM protocol."""

    def __init__(self, model: nn.Module, probes: "HFCausalLM | None" = None):
        """probes: a stand-in of the same architecture with real weights, probed instead of
        `model` (a streamed model computes with zeros, which every numerical probe passes)."""
        super().__init__()
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__}: encoder-decoder models are not causal LMs")
        model.set_attn_implementation("eager")
        self._state_layout = _take_stateful_layers(model)
        # Llama 4's chunked layers attend within their chunk of attention_chunk_size positions.
        self.chunk = int(config.attention_chunk_size) \
            if "chunked_attention" in (getattr(config, "layer_types", None) or []) else None
        for name, module in model.named_modules():
            if type(module).__name__ == "PhimoeRotaryEmbedding" and module.rope_type != "default":
                model.set_submodule(name, _LongRopeScale(module))
        self.hf = model.eval()
        self.config = config
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if probes is not None:
            self._kv_layout = (len(self._kv_layers), *probes._kv_layout[1:])
            self.window, self.mixed_attention, self._in_place_kv = probes.window, probes.mixed_attention, probes._in_place_kv
        else:
            self._kv_layout = self._probe_kv_layout()
            self.window, self.mixed_attention = self._probe_attention_window()
            self._in_place_kv = self.window is None and self.chunk is None and self._probe_in_place_kv()
            if self._in_place_only and not self._in_place_kv:
                kinds = sorted({f"{state.kind} state" for state in self._state_layout}
                               | ({"cacheless blocks"} if self._cacheless_layers else set()))
                raise ValueError(f"{type(model).__name__}: its layers ({', '.join(kinds)}) run only "
                                 f"through the in-place cache, and through it the model does not reproduce "
                                 f"transformers' forward{' (windowed or chunked attention)' if self.window or self.chunk else ''}")
        self.cfg = SimpleNamespace(vocab_size=config.vocab_size, d_model=config.hidden_size,
                                   max_positions=getattr(config, "max_position_embeddings", None))

    @property
    def kv_layout(self) -> tuple[int, int, int, int, int]:
        """(attention layers, key heads, key dim, value heads, value dim) of what the model caches:
        plain attention caches keys and values per KV head; DeepSeek's latent attention caches its
        compressed latent and rope key instead, so the sizes come from a probe, not the config.
        Stateful layers (LFM2's convolutions) cache no keys: they are in `state_layout`."""
        return self._kv_layout

    @property
    def query_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def state_layout(self) -> list[LayerState]:
        """The layers that carry a fixed-size state between steps instead of keys and values."""
        return self._state_layout

    @property
    def _stateful_layers(self) -> set[int]:
        """The decoder layers (indices) that carry states."""
        return {state.layer for state in self._state_layout}

    @property
    def _cacheless_layers(self) -> set[int]:
        """The decoder layers that cache nothing: NemotronH's blocks of one MLP or MoE (kinds
        "mlp", "moe" in its layer_types, which transformers' caches also skip)."""
        return {i for i, kind in enumerate(getattr(self.config, "layer_types", None) or []) if kind in CACHELESS_KINDS}

    @property
    def _kv_layers(self) -> list[int]:
        """The decoder layers that cache keys and values, in cache order."""
        skipped = self._stateful_layers | self._cacheless_layers
        return [i for i in range(self.config.num_hidden_layers) if i not in skipped]

    @property
    def _in_place_only(self) -> bool:
        """Whether the model runs only through the in-place protocol: the concatenating cache has
        one key/value pair per decoder layer, with no place for states or cacheless layers."""
        return bool(self._state_layout or self._cacheless_layers)

    def _probe_kv_layout(self) -> tuple[int, int, int, int, int]:
        from transformers import DynamicCache

        stateful = self._stateful_layers
        layer_types = getattr(self.config, "layer_types", None) or []
        kinds = sorted({kind for i, kind in enumerate(layer_types) if i not in stateful}
                       - {"full_attention", "sliding_attention", "chunked_attention", "attention", *CACHELESS_KINDS})
        if kinds:  # linear attention other than Mamba2 (a recurrent state), indexed attention, ...
            raise ValueError(f"{type(self.hf).__name__}: layers of kind {kinds} are not supported: only full, "
                             f"sliding-window and chunked attention (a per-layer key/value cache and a position mask), "
                             f"LFM2's short convolutions, Mamba2 mixers and gated delta nets (a per-layer state), "
                             f"blocks of one MLP or MoE")
        # Stateful and cacheless layers need transformers' per-kind cache layers to run at all.
        cache = DynamicCache(config=self.config) if self._in_place_only else DynamicCache()
        try:
            with torch.no_grad():
                self.hf(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True, **{self._cache_kwarg: cache})
        except (IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # e.g. a hybrid model's own cache type
            raise ValueError(f"{type(self.hf).__name__}: does not run with a plain per-layer key/value cache "
                             f"(transformers DynamicCache): {type(e).__name__}: {e}") from e
        attention = [cache.layers[i] for i in self._kv_layers if i < len(cache.layers)]
        shapes = {(tuple(layer.keys.shape[1::2]), tuple(layer.values.shape[1::2])) for layer in attention
                  if getattr(layer, "keys", None) is not None}
        if len(cache.layers) != self.config.num_hidden_layers or len(shapes) != 1 or not attention:
            raise ValueError(f"{type(self.hf).__name__}: its cache is not one key/value pair per layer of one "
                             f"shape ({len(cache.layers)} layers, shapes {sorted(shapes)}); not supported")
        ((key_heads, key_dim), (value_heads, value_dim)), = shapes
        return len(attention), key_heads, key_dim, value_heads, value_dim

    @property
    def in_place_kv(self) -> bool:
        """Whether the in-place KV cache (compiler/kv_cache.py) serves this model: its attention
        is causal over all positions (a sliding window keeps the concatenating cache) and what
        it caches is what its attention reads (DeepSeek's latent attention caches a compressed
        latent and expands it per head after the cache: concatenating cache)."""
        return self._in_place_kv

    def _probe_in_place_kv(self) -> bool:
        """Run 4 tokens through the in-place protocol eagerly (the op has an eager form) and
        compare with the model's own forward."""
        from ..kv_cache import InPlaceLayer

        tokens = torch.arange(1, 5)[None] % self.config.vocab_size
        self._in_place_kv = True
        try:
            with torch.no_grad():
                ours = self._in_place_forward(tokens)
                theirs = self.hf(input_ids=tokens).logits
            return bool(torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5))
        except (RuntimeError, ValueError, IndexError, TypeError):  # e.g. shapes of a cache its attention does not read
            return False

    def _in_place_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step over whole sequences through the in-place protocol's eager ops, on fresh buffers."""
        from ..attention import LANES
        from ..kv_cache import InPlaceLayer
        from ..layer_state import HOLDERS

        b, s = tokens.shape
        past = torch.zeros(b, 0, dtype=torch.long)
        kv = KVCacheLayout("in_place", block=LANES, capacity_multiple=LANES)
        key_shape, value_shape = kv.buffer_shapes(self._kv_layout, b, -(-s // LANES) * LANES)
        buffers = [InPlaceLayer(torch.zeros(key_shape), torch.zeros(value_shape), past) for _ in range(self._kv_layout[0])]
        states = [HOLDERS[state.kind](torch.zeros(b, *state.shape), past) for state in self._state_layout]
        return self.step(tokens, torch.arange(s).expand(b, s), past, buffers, None, states=states)[0]

    def forward(self, tokens):
        """Stateful and cacheless layers run only through the in-place protocol (`_in_place_only`)."""
        return self._in_place_forward(tokens) if self._in_place_only else super().forward(tokens)

    @property
    def full_layers(self) -> list[int]:
        """The KV layers (in cache order) that attend to every position in a model that windows
        the others (`mixed_attention`); [] where the window is on every layer or on none."""
        bounded = "chunked_attention" if self.chunk is not None else \
            "sliding_attention" if self.window is not None and self.mixed_attention else None
        if bounded is None:
            return []
        kinds = [self.config.layer_types[i] for i in self._kv_layers]
        return [i for i, kind in enumerate(kinds) if kind != bounded]

    def step(self, tokens, positions, past_positions, past_keys, past_values, states=(), window_positions=None):
        """Same contract as ReferenceMoELM.step: logits (b, s, vocab) and per-layer keys/values
        (b, kv_heads, p + s, head_dim); with past_values None, past_keys are in-place cache
        layers and attention runs through them (keys/values returned None), and `states` are the
        stateful layers' state buffers (compiler/layer_state.py), in `state_layout`'s order.
        window_positions: where only some layers are windowed (`full_layers`), the positions the
        windowed (or chunked) layers' past keys/values hold (the last window - 1, or the current
        chunk's; past_positions: all)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if past_values is None:
            return self._step_in_place(tokens, positions, past_positions, past_keys, states)
        if window_positions is None:
            window_positions = past_positions
        full = set(self.full_layers)
        for i, (k, v) in enumerate(zip(past_keys, past_values)):  # one past length per kind (lets export unify them)
            held = past_positions if i in full or not full else window_positions
            torch._check(k.shape[2] == held.shape[1])
            torch._check(v.shape[2] == held.shape[1])
        cache = DynamicCache()
        cache.layers = []
        for k, v in zip(past_keys, past_values):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)

        key_positions = torch.cat([past_positions, positions], dim=1)
        causal = key_positions[:, None, :] <= positions[:, :, None]
        additive = lambda visible: torch.zeros(visible.shape, dtype=self.hf.dtype).masked_fill(  # noqa: E731
            ~visible, torch.finfo(self.hf.dtype).min)[:, None]
        mask = additive(causal)
        if self.window is not None:
            window_keys = torch.cat([window_positions, positions], dim=1)
            windowed = additive((window_keys[:, None, :] <= positions[:, :, None])
                                & (window_keys[:, None, :] > positions[:, :, None] - self.window))
            # Models mixing layer kinds take one mask per kind (transformers' causal_mask_mapping).
            mask = {"full_attention": mask, "sliding_attention": windowed} if self.mixed_attention else windowed
        if self.chunk is not None:
            # an int64 divisor: a Python int imports as an int32 constant, which TVM refuses to mix
            divisor = torch.full((), self.chunk, dtype=positions.dtype)
            chunk_keys = torch.cat([window_positions, positions], dim=1)  # what the chunked layers hold
            same_chunk = (chunk_keys // divisor)[:, None, :] == (positions // divisor)[:, :, None]
            mask = {"full_attention": mask,
                    "chunked_attention": additive((chunk_keys[:, None, :] <= positions[:, :, None]) & same_chunk)}
        out = self.hf(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{self._cache_kwarg: cache})
        return out.logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]

    def _step_in_place(self, tokens, positions, past_positions, layers, states):
        from transformers import AttentionInterface

        from ..kv_cache import ATTENTION_NAME, hf_attention, in_place_cache_class

        if not self.in_place_kv:
            raise ValueError(f"{type(self.hf).__name__}: its attention needs the concatenating KV cache")
        if len(states) != len(self._state_layout):
            raise ValueError(f"{type(self.hf).__name__}: expected {len(self._state_layout)} layer states, got {len(states)}")
        AttentionInterface.register(ATTENTION_NAME, hf_attention)
        cache = in_place_cache_class()([layer.key_buffer for layer in layers], [layer.value_buffer for layer in layers],
                                       past_positions, _by_layer(self._state_layout, states), self._kv_layers,
                                       self.config.num_hidden_layers)
        before = self.config._attn_implementation
        self.hf.set_attn_implementation(ATTENTION_NAME)
        try:
            with hf_attention.using(cache):
                out = self.hf(input_ids=tokens, position_ids=positions, use_cache=True, **{self._cache_kwarg: cache})
        finally:
            self.hf.set_attn_implementation(before)
        return out.logits, [None] * len(layers), [None] * len(layers)

    def _probe_attention_window(self) -> tuple[int | None, bool]:
        """(window, mixed): whether transformers' own masks for this model are sliding-window, on
        every layer or per layer kind. Configs do not say it uniformly (OLMoE carries a
        `sliding_window` it never applies, Mixtral applies it without `layer_types`), so run the
        model with a window of 2 on 4 tokens under its own masks and keep the mask of ours that
        reproduces it."""
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return None, False
        tokens = torch.arange(1, 5)[None] % self.config.vocab_size
        self.config.sliding_window = 2
        # A model with stateful or cacheless layers runs only through the in-place cache, whose
        # attention is never windowed: only "no window" can reproduce transformers' masks there.
        self._in_place_kv = self._in_place_only
        try:
            with torch.no_grad():
                theirs = self.hf(input_ids=tokens).logits
                for self.window, self.mixed_attention in ((None, False), (2, False), (2, True)):
                    if torch.allclose(self(tokens), theirs, rtol=1e-4, atol=1e-5):
                        return (int(window) if self.window else None), self.mixed_attention
        finally:
            self.config.sliding_window = window
        raise ValueError(f"{type(self.hf).__name__}: its attention masks (sliding window {window}) are neither full, "
                         f"windowed, nor windowed per layer kind; not supported")

    @contextmanager
    def exportable(self):
        """Within: `forward` captures whole (MoE blocks included) with torch.export / torch.onnx,
        using transformers' `batched_mm` experts (the default `grouped_mm` exports a custom op and
        `histc`; `eager` loops over `nonzero()`). The compiler never needs this (it cuts MoE
        blocks out); `moetvm export-onnx` writes the whole model with it."""
        before = self.config._experts_implementation
        self.hf.set_experts_implementation("batched_mm")
        try:
            yield self
        finally:
            self.hf.set_experts_implementation(before)


def _take_stateful_layers(model: nn.Module) -> list[LayerState]:
    """The layers that carry a state between steps (compiler/layer_state.py), made to run through
    the in-place protocol's state ops when the cache passed to them holds their states, and as
    before otherwise; returns their states in layer order. Found by structure:
      LFM2's short convolutions (`*ShortConv`: in_proj -> B, C, x; B*x through a causal depthwise
        conv; C * that -> out_proj): a conv state;
      Mamba2 mixers (A_log, D, dt_bias, conv1d, a gated norm: Granite-4.0-H's): a conv and a scan state;
      gated delta nets (conv1d over q, k, v; A_log, dt_bias; in_proj_qkvz + in_proj_ba as in
        Qwen3-Next, or in_proj_qkv, _z, _b, _a as in Qwen3.5): a conv and a delta-rule state.
    Whether the rewritten layers compute what transformers' do is then probed (HFCausalLM)."""
    states = []
    for module in model.modules():
        if type(module).__name__.endswith("ShortConv") and hasattr(module, "in_proj"):
            channels = module.conv.in_channels
            if module.in_proj.out_features != 3 * channels:
                raise ValueError(f"{type(module).__name__}: in_proj gives {module.in_proj.out_features} features, "
                                 f"not B, C and x of {channels}; not supported")
            states.append(_conv_state(module, module.conv))
            module.forward = functools.partial(_short_conv_forward, module, module.forward)
        elif all(hasattr(module, a) for a in MAMBA2_ATTRIBUTES):
            limit = tuple(float(v) for v in getattr(module, "time_step_limit", (0.0, float("inf"))))
            if limit != (0.0, float("inf")):
                raise ValueError(f"{type(module).__name__}: time step limits {limit} are not supported (only none)")
            states += [_conv_state(module, module.conv1d),
                       LayerState("ssm", int(module.layer_idx), [module.num_heads, module.head_dim, module.ssm_state_size])]
            module.forward = functools.partial(_mamba2_forward, module, module.forward)
        elif all(hasattr(module, a) for a in GATED_DELTA_ATTRIBUTES) and _delta_projections(module) is not None:
            if module.num_v_heads % module.num_k_heads:
                raise ValueError(f"{type(module).__name__}: {module.num_v_heads} value heads do not share "
                                 f"{module.num_k_heads} key heads evenly; not supported")
            states += [_conv_state(module, module.conv1d),
                       LayerState("delta", int(module.layer_idx), [module.num_v_heads, module.head_v_dim, module.head_k_dim])]
            module.forward = functools.partial(_gated_delta_forward, module, module.forward)
    return sorted(states, key=lambda state: state.layer)  # stable: a layer's conv state before its scan's


GATED_DELTA_ATTRIBUTES = ("conv1d", "A_log", "dt_bias", "norm", "out_proj", "num_k_heads", "num_v_heads", "head_k_dim",
                          "head_v_dim", "key_dim", "value_dim", "activation", "layer_idx")
CACHELESS_KINDS = ("mlp", "moe")  # layer_types of blocks that hold no attention or state
MAMBA2_ATTRIBUTES = ("in_proj", "conv1d", "A_log", "D", "dt_bias", "norm", "out_proj", "n_groups", "head_dim",
                     "num_heads", "ssm_state_size", "intermediate_size", "conv_dim", "act", "layer_idx")


def _by_layer(layout: list[LayerState], holders: list) -> dict[int, dict]:
    """decoder layer -> {state kind -> holder}."""
    layers: dict[int, dict] = {}
    for spec, holder in zip(layout, holders):
        layers.setdefault(spec.layer, {})[spec.kind] = holder
    return layers


def _conv_state(module: nn.Module, conv: nn.Conv1d) -> LayerState:
    kernel, channels = conv.kernel_size[0], conv.in_channels
    if conv.groups != channels or conv.out_channels != channels or kernel < 2:
        raise ValueError(f"{type(module).__name__}: its convolution is not depthwise of kernel >= 2; not supported")
    return LayerState("conv", int(module.layer_idx), [kernel - 1, channels])


def _states_of(module, cache) -> dict | None:
    """The layer's state holders in the in-place cache (kind -> holder); None in transformers' own."""
    return getattr(cache.layers[module.layer_idx], "states", None) if hasattr(cache, "layers") else None


def _convolve(conv: nn.Conv1d, holder, x):
    y = holder.convolve(x, conv.weight[:, 0, :])
    return y + conv.bias if conv.bias is not None else y


def _short_conv_forward(module, original, hidden_states, cache=None, attention_mask=None, **kwargs):
    states = _states_of(module, cache)
    if states is None:
        return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    gate_b, gate_c, x = module.in_proj(hidden_states).chunk(3, dim=-1)
    return module.out_proj(gate_c * _convolve(module.conv, states["conv"], gate_b * x))


def _mamba2_forward(module, original, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' Mamba2 mixer forward (no padding mask: the protocol's rows are whole) with
    its convolution and scan as the state ops."""
    states = _states_of(module, cache)
    if states is None:
        return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    gate, xbc, dt = module.in_proj(hidden_states).split([module.intermediate_size, module.conv_dim, module.num_heads], -1)
    xbc = module.act(_convolve(module.conv1d, states["conv"], xbc))
    bc = module.n_groups * module.ssm_state_size
    x, b, c = xbc.split([module.intermediate_size, bc, bc], dim=-1)
    groups = (module.n_groups, module.ssm_state_size)
    y = states["ssm"].scan(x.unflatten(-1, (module.num_heads, module.head_dim)), dt, -torch.exp(module.A_log.float()),
                           b.unflatten(-1, groups), c.unflatten(-1, groups), module.D, module.dt_bias)
    return module.out_proj(module.norm(y.flatten(-2), gate))


def _delta_projections(module):
    """hidden -> (q, k, v flattened, z (b, s, value heads, value_dim), b, a) of a gated delta
    net, by its projections; None for projections this does not know."""
    if hasattr(module, "in_proj_qkvz") and hasattr(module, "in_proj_ba") and hasattr(module, "fix_query_key_value_ordering"):
        def project(hidden):
            q, k, v, z, b, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(hidden), module.in_proj_ba(hidden))
            return (*(t.flatten(2) for t in (q, k, v)), z, b, a)
        return project
    if all(hasattr(module, f"in_proj_{p}") for p in ("qkv", "z", "b", "a")):
        def project(hidden):
            q, k, v = module.in_proj_qkv(hidden).split([module.key_dim, module.key_dim, module.value_dim], -1)
            z = module.in_proj_z(hidden).unflatten(-1, (-1, module.head_v_dim))
            return q, k, v, z, module.in_proj_b(hidden), module.in_proj_a(hidden)
        return project
    return None


def _l2_normalised(x):
    """transformers' l2norm (the FLA library's): x / sqrt(sum x^2 + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _gated_delta_forward(module, original, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' gated delta net forward (Qwen3-Next's recurrent form) with its convolution
    and recurrence as the state ops."""
    from transformers.activations import ACT2FN

    states = _states_of(module, cache)
    if states is None:
        return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    q, k, v, z, b, a = _delta_projections(module)(hidden_states)
    qkv = ACT2FN[module.activation](_convolve(module.conv1d, states["conv"], torch.cat([q, k, v], -1)))
    q, k, v = qkv.split([module.key_dim, module.key_dim, module.value_dim], -1)
    q, k = (_l2_normalised(t.unflatten(-1, (-1, module.head_k_dim))) for t in (q, k))
    g = -module.A_log.float().exp() * nn.functional.softplus(a.float() + module.dt_bias)
    out = states["delta"].update(q * module.head_k_dim ** -0.5, k, v.unflatten(-1, (-1, module.head_v_dim)), g,
                                 b.sigmoid())
    out = module.norm(out.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(z.shape).flatten(2))


class _LongRopeScale(nn.Module):
    """PhiMoE's rotary embedding (transformers' PhimoeRotaryEmbedding.forward) with its one
    Python branch made a tensor op: the cos/sin scale is long_mscale once the step's last
    position passes original_max_position_embeddings, else short_mscale; the frequencies are the
    ones its forward computes, the short factors, whatever the length."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        params = rotary.config.rope_parameters
        self.original = int(params["original_max_position_embeddings"])
        self.short_mscale, self.long_mscale = float(params["short_mscale"]), float(params["long_mscale"])
        self.inv_freq = nn.Buffer(rotary.rope_init_fn(rotary.config)[0].float(), persistent=False)

    def forward(self, x, position_ids):
        longer = (position_ids.max() + 1) > self.original
        mscale = torch.where(longer, self.long_mscale, self.short_mscale)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)


def load_hf(path: str | Path, stream: bool = False) -> HFCausalLM:
    """A local transformers model directory (config.json + safetensors), no network, fp32.
    stream: the weights stay in the checkpoint (compiler/checkpoint.py), each parameter on zero
    pages with its `checkpoint_source`: the model can be traced and its weights read one at a
    time, but running it computes with zeros (`HFCausalLM.streamed`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        from . import ModelSourceError

        raise ModelSourceError(f"hf:{path}: no config.json there (a local transformers model directory is needed)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("transformers models need the hf extra: pip install 'moetvm[hf]'") from e
    if stream:
        from transformers import AutoConfig

        from ..checkpoint import probe_stand_in, streamed_hf_model

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        hf = streamed_hf_model(path, config)
        model = HFCausalLM(hf, probes=HFCausalLM(probe_stand_in(config)))
        model.streamed, model.checkpoint_precision = True, hf.checkpoint_precision
    else:
        model = HFCausalLM(AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32))
    # The directory's tokenizer, when it has one, goes into the artifact (compiler/tokenizer.py).
    model.tokenizer_source = TokenizerSource.from_directory(path, model.cfg.vocab_size, model.config.to_dict())
    return model
