"""The shipped reference model: a small byte-level MoE language model.

Blocks are pre-norm: h += attn(norm(h)); h += moe(norm(h)). The MoE FFN uses softmax top-k
routing over SwiGLU experts (Mixtral style). Positions are learned absolute embeddings, and the
causal mask is computed from explicit position ids so that a KV-cached step needs no symbolic
`arange` (which keeps the exported graph simple for TVM).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import TokenizerSource
from .lm import KVCachedLM


@dataclass(frozen=True)
class ReferenceConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    n_experts: int = 8
    top_k: int = 2
    max_positions: int = 512
    norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLUExpert(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoEBlock(nn.Module):
    """Softmax top-k routing with renormalised weights over SwiGLU experts."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(d_model, d_ff) for _ in range(n_experts))

    def route(self, x):
        """Return (probabilities over all experts, top-k weights, top-k indices)."""
        probs = F.softmax(self.router(x), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        return probs, weights / weights.sum(-1, keepdim=True), indices

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, weights, indices = self.route(x)
        if torch.compiler.is_exporting():
            # Export cannot trace the per-expert token gather below (data-dependent sizes): run
            # every expert on every token, weighted by the routing weights scattered to a dense
            # (tokens, experts) matrix; unselected experts get weight 0, so the function is the same.
            dense = x.new_zeros(x.shape[0], len(self.experts)).scatter(1, indices, weights)
            out = sum(expert(x) * dense[:, e, None] for e, expert in enumerate(self.experts))
            return out.reshape(shape)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, key_padding_free_mask, past_k, past_v):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_v is None:  # past_k is an in-place cache layer (compiler/kv_cache.py): it appends and attends
            y = past_k.attend(q, k, v, 1 / math.sqrt(self.head_dim))
            return self.out(y.reshape(b, s, d)), None, None
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~key_padding_free_mask[:, None], -1e9)
        y = F.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, d)), k, v


class Block(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoEBlock(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k)

    def forward(self, h, mask, past_k, past_v):
        a, k, v = self.attn(self.attn_norm(h), mask, past_k, past_v)
        h = h + a
        return h + self.moe(self.moe_norm(h)), k, v


class ReferenceMoELM(KVCachedLM):
    """Byte-level causal MoE LM with an explicit KV-cache step (the compiler's LM protocol)."""

    in_place_kv = True

    def __init__(self, cfg: ReferenceConfig = ReferenceConfig()):
        super().__init__()
        self.cfg = cfg
        # Its tokens are the bytes of UTF-8 text (with the standard 256-token vocabulary).
        self.tokenizer_source = TokenizerSource.bytes() if cfg.vocab_size == 256 else None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    # --- the KV-cached LM protocol the compiler exports -------------------------------------
    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the KV cache `step` takes and returns."""
        return self.cfg.n_layers, self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads

    @property
    def query_heads(self) -> int:
        return self.cfg.n_heads

    def step(self, tokens, positions, past_positions, past_keys, past_values):
        """One forward over new tokens given cached keys/values.

        tokens, positions: (b, s) int64; past_positions: (b, p) int64 positions of cached keys;
        past_keys/values: per layer (b, heads, p, head_dim). Returns logits (b, s, vocab) and the
        new per-layer keys/values (b, heads, p + s, head_dim). With past_values None, past_keys are
        in-place cache layers (compiler/kv_cache.py) and the keys/values returned are None.
        """
        past = past_positions.shape[1]
        if past_values is None:
            past_values = [None] * len(past_keys)
        else:
            for k, v in zip(past_keys, past_values):  # one past length for all (lets export unify it)
                torch._check(k.shape[2] == past)
                torch._check(v.shape[2] == past)
        key_positions = torch.cat([past_positions, positions], dim=1)
        mask = key_positions[:, None, :] <= positions[:, :, None]
        h = self.embed(tokens) + self.pos_embed(positions)
        keys, values = [], []
        for block, pk, pv in zip(self.blocks, past_keys, past_values):
            h, k, v = block(h, mask, pk, pv)
            keys.append(k)
            values.append(v)
        return self.head(self.final_norm(h)), keys, values

    def moe_blocks(self) -> list[MoEBlock]:
        return [block.moe for block in self.blocks]


# --- checkpoint I/O --------------------------------------------------------------------------
def save_checkpoint(model: ReferenceMoELM, path: Path, extra: dict | None = None) -> None:
    """fp16 safetensors (keeps the shipped file under 10 MB) + config in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(asdict(model.cfg)), "extra": json.dumps(extra or {})}
    save_file(tensors, str(path), metadata=meta)


def load_checkpoint(path: Path) -> ReferenceMoELM:
    """Load as fp32 (the fp16-rounded weights are the reference)."""
    from safetensors import SafetensorError, safe_open

    from . import ModelSourceError

    try:
        with safe_open(str(path), framework="pt") as f:
            config = (f.metadata() or {}).get("config")
            if config is None:
                raise ModelSourceError(f"model {path}: a safetensors file without the reference model's 'config' "
                                       f"metadata (not a moetvm reference checkpoint; for transformers use hf:DIR)")
            cfg = ReferenceConfig(**json.loads(config))
            state = {k: f.get_tensor(k).float() for k in f.keys()}
    except ModelSourceError:
        raise
    except (SafetensorError, OSError) as e:
        raise ModelSourceError(f"model {path}: not a readable safetensors checkpoint ({e})") from None
    except (ValueError, TypeError) as e:
        raise ModelSourceError(f"model {path}: bad reference config in the checkpoint metadata ({e})") from None
    model = ReferenceMoELM(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelSourceError(f"model {path}: weights do not match its config ({first})") from None
    return model.eval()


def checkpoint_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata().get("extra", "{}"))
