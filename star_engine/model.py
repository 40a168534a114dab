"""One compact decoder for the Llama family: Llama 2/3/3.1, Qwen2/2.5 (qkv bias), Mistral.

The model does not own its attention: every layer calls an `attend(layer, q, k, v)`
function given by the caller, so that one model serves every attention strategy and both
phases (block-local context encoding, sequence-global query and generation).
Shapes inside a layer: q [heads, tokens, head_dim], k and v [kv_heads, tokens, head_dim].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C

# Tokens per pass of the per-token work (projections, RoPE, MLP): a block of 10^5 tokens
# then needs transient memory for 8192 tokens only, beside its q, k, v and hidden states.
PREFILL_CHUNK = 8192

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""attend(layer, q, k, v) -> o: attention output [heads, tokens, head_dim] of the new tokens."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None, {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, {"rope_type": "linear", "factor"}, or
    # {"rope_type": "freq_factors", "factors": [...]} (GGUF's rope_freqs tensor).
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 8192
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face config.json of a Llama, Qwen2 or Mistral model."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected llama, qwen2 or mistral")
        window = cfg.get("sliding_window")
        if window is not None and cfg.get("use_sliding_window", model_type == "mistral"):
            raise ValueError(f"sliding-window attention (window {window}) is not supported: "
                             "this engine computes full attention")
        if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
            raise ValueError("only SiLU-gated MLPs without bias are supported")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5 keeps theta here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"unsupported rope scaling {kind!r}: expected llama3 or linear")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            eos_token_ids=eos,
        )


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Shapes of public models (their config.json), for random-weight benchmarks.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=16384),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                                max_position_embeddings=131072),
    "llama-3.1-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                 num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                                 rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                                 max_position_embeddings=131072),
}


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
    return x.is_cuda and _C.WITH_CUDA


def apply_rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotates x [tokens, heads, head_dim] in place by the halves convention of Hugging Face
    Llama, in float32; cos, sin [tokens, head_dim] float32."""
    if _kernels_for(x):
        _C.rope_(x, cos, sin)
        return
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    x.copy_(x32 * cos[:, None] + rotated * sin[:, None])


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the fused projection's output [tokens, 2 * intermediate]."""
    if _kernels_for(gate_up):
        return _C.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _kernels_for(x) and self.weight.dtype == x.dtype and x.shape[-1] % 8 == 0:
            return _C.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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
        accumulation (addmm_), not separate passes."""
        for start in range(0, x.shape[0], PREFILL_CHUNK):
            end = start + PREFILL_CHUNK
            part = x[start:end]
            part.addmm_(o[:, start:end].transpose(0, 1).reshape(part.shape[0], -1), self.wo.weight.t())
            part.addmm_(silu_mul(self.w_gate_up(self.mlp_norm(part))), self.w_down.weight.t())
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: Rotary | None = None

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.rotary is None or self.rotary.inv_freq.device != self.embed.weight.device:
            self.rotary = Rotary(self.config, self.embed.weight.device)
        return self.rotary(positions)

    def forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """Hidden states [tokens, hidden] after the last layer (before the final norm)."""
        cos, sin = self.rope(positions)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, attend(i, q, k, v))
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (float32) of hidden states [tokens, hidden]."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(hidden), weight).float()
