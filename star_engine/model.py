"""One compact decoder for the Llama family: Llama 2/3/3.1, Qwen2/2.5 (qkv bias), Mistral.

The model does not own its attention: every layer calls an `attend(layer, q, k, v)`
function given by the caller, so that one model serves every attention strategy and both
phases (block-local context encoding, sequence-global query and generation).
Shapes inside a layer: q [heads, tokens, head_dim], k and v [kv_heads, tokens, head_dim].

Under tensor parallelism (shard.py) a model holds one rank's part: its heads (those are
the shapes above), its share of the MLP and of the vocabulary; the host's collectives sum
the o and down projections' partial products, the embedding's parts, and gather the
logits' parts, so that every rank of a host holds the whole hidden state.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import ModelConfig
from .shard import Shard

# Tokens per pass of the per-token work (projections, RoPE, MLP): a block of 10^5 tokens
# then needs transient memory for 8192 tokens only, beside its q, k, v and hidden states.
PREFILL_CHUNK = 8192

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""attend(layer, q, k, v) -> o: attention output [heads, tokens, head_dim] of the new tokens."""


class HostCollectives(Protocol):
    """What a model split over the ranks of a host needs from them."""
    size: int

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sums tensor over the host's ranks, in place; the same result on every rank."""

    def all_gather(self, tensor: Tensor) -> Tensor:
        """[size, *tensor.shape]: every rank's tensor, in rank order."""


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies of the rotary embedding (float64), scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between interpolated smoothly (Meta's Llama 3.1 reference rule).
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen < old_len / high, inv_freq,
                       torch.where(wavelen > old_len / low, inv_freq / factor, scaled))


class Rotary:
    """cos/sin tables for arbitrary positions (positions may jump, as in an anchored block)."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(cfg).to(device)

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # Angles in float64: positions reach 10^6, where float32 loses the phase.
        angles = positions.to(self.inv_freq.device, torch.float64)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float(), angles.sin().float()


def _kernels_for(x: Tensor) -> bool:
    """Whether the extension's fused layer kernels serve x (on GPUs they replace several
    eager PyTorch launches each, which is what a decode step's time goes to)."""
    return x.is_cuda and ops.WITH_CUDA


def apply_rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotates x [tokens, heads, head_dim] in place by the halves convention of Hugging Face
    Llama, in float32; cos, sin [tokens, head_dim] float32."""
    if _kernels_for(x):
        ops.rope_(x, cos, sin)
        return
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    x.copy_(x32 * cos[:, None] + rotated * sin[:, None])


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the fused projection's output [tokens, 2 * intermediate]."""
    if _kernels_for(gate_up):
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _kernels_for(x) and self.weight.dtype == x.dtype and x.shape[-1] % 8 == 0:
            return ops.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, host: HostCollectives | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = len(shard.heads), len(shard.kv_heads), cfg.head_dim
        q_dim, kv_dim, inner = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim, len(shard.intermediate)
        self.host = host
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * inner, bias=False)
        self.w_down = nn.Linear(inner, cfg.hidden_size, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections of x [tokens, hidden], RoPE applied: q [H, T, D], k and v [KV, T, D]."""
        t, h, kv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if t <= PREFILL_CHUNK:
            qkv = self._qkv_chunk(x, cos, sin)
        else:
            qkv = x.new_empty(t, h + 2 * kv, d)
            for start in range(0, t, PREFILL_CHUNK):
                end = start + PREFILL_CHUNK
                qkv[start:end] = self._qkv_chunk(x[start:end], cos[start:end], sin[start:end])
        q, k, v = qkv.split([h, kv, kv], dim=1)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def _qkv_chunk(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        qkv = self.wqkv(self.attn_norm(x)).view(x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        apply_rope_(qkv[:, :self.num_heads + self.num_kv_heads], cos, sin)
        return qkv

    def finish(self, x: Tensor, o: Tensor) -> Tensor:
        """Output projection of the attention o [H, T, D], residual, and the MLP; updates x
        [tokens, hidden] in place and returns it. The residual adds are the products' own
        accumulation (addmm_), not separate passes; on a host of several ranks each product
        is this rank's part, summed over the host before it is added."""
        for start in range(0, x.shape[0], PREFILL_CHUNK):
            end = start + PREFILL_CHUNK
            part = x[start:end]
            attended = o[:, start:end].transpose(0, 1).reshape(part.shape[0], -1)
            if self.host is None:
                part.addmm_(attended, self.wo.weight.t())
                part.addmm_(silu_mul(self.w_gate_up(self.mlp_norm(part))), self.w_down.weight.t())
            else:
                part.add_(self.host.all_reduce_(attended @ self.wo.weight.t()))
                part.add_(self.host.all_reduce_(silu_mul(self.w_gate_up(self.mlp_norm(part))) @ self.w_down.weight.t()))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard | None = None, host: HostCollectives | None = None) -> None:
        """The whole model, or (shard, and the collectives of its host) one rank's part."""
        super().__init__()
        self.config = cfg
        self.shard = shard or Shard.of(cfg)
        self.host = host if self.shard.size > 1 else None
        self.heads, self.kv_heads = len(self.shard.heads), len(self.shard.kv_heads)  # this rank's
        vocab = len(self.shard.vocab)
        # Weights are loaded or drawn after (checkpoint.py), so nn.Embedding's own random
        # init is skipped: on the meta device its first normal_ costs a second of imports.
        self.embed = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.shard, self.host) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.rotary: Rotary | None = None

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.rotary is None or self.rotary.inv_freq.device != self.embed.weight.device:
            self.rotary = Rotary(self.config, self.embed.weight.device)
        return self.rotary(positions)

    def forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """Hidden states [tokens, hidden] after the last layer (before the final norm)."""
        cos, sin = self.rope(positions)
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, attend(i, q, k, v))
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (float32) of hidden states [tokens, hidden], the whole
        vocabulary's on every rank of a host."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(hidden), weight).float()
        if self.host is None:
            return logits
        padded = logits.new_full((logits.shape[0], self.shard.vocab_width), float("-inf"))
        padded[:, :logits.shape[1]] = logits
        parts = self.host.all_gather(padded)  # [ranks, tokens, width]
        return parts.permute(1, 0, 2).reshape(logits.shape[0], -1)[:, :self.config.vocab_size]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Embeddings of ids [tokens]: on a host of several ranks, each looks up the ids of
        its part of the vocabulary (zeros elsewhere) and the host sums them."""
        if self.host is None:
            return self.embed(ids)
        local = ids - self.shard.vocab.start
        outside = (local < 0) | (local >= len(self.shard.vocab))
        x = self.embed(local.masked_fill(outside, 0))
        return self.host.all_reduce_(x.masked_fill_(outside[:, None], 0))
