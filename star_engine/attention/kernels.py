"""The local attention kernels, each returning o [H, Tq, D] and lse [H, Tq] (float32):

  exact       float32 arithmetic, query-chunked: CPUs, float32, and the reference of the others
  cudnn       cuDNN's fused attention through PyTorch (GPU, fp16/bf16)
  flash-attn  the flash-attn package, when installed (GPU, fp16/bf16)
  flash       PyTorch's FlashAttention-2 kernel (GPU, fp16/bf16)

Shapes: q [H, Tq, D], k and v [KV, Tk, D], H a multiple of KV (grouped-query heads).
`causal` aligns the mask bottom-right (query i sits at key position Tk - Tq + i). PyTorch's
fused kernels align it top-left, so there a bottom-right call with Tq < Tk runs as two: the
queries over the first Tk - Tq keys (no mask) and over the last Tq (square causal), merged.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from .merge import merge_into


# Bound on the score matrix of one query chunk (elements), to keep long contexts in memory.
_MAX_SCORES = 1 << 26


def exact_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    heads, tq, dim = q.shape
    kv_heads, tk, _ = k.shape
    group = heads // kv_heads
    qg = q.float().reshape(kv_heads, group, tq, dim)
    k32, v32 = k.float(), v.float()
    o = torch.empty(kv_heads, group, tq, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(kv_heads, group, tq, dtype=torch.float32, device=q.device)
    chunk = max(1, _MAX_SCORES // (heads * tk))
    key_pos = torch.arange(tk, device=q.device)
    for start in range(0, tq, chunk):
        end = min(tq, start + chunk)
        scores = torch.einsum("kgqd,ksd->kgqs", qg[:, :, start:end], k32) * dim ** -0.5
        if causal:
            query_pos = torch.arange(start, end, device=q.device) + (tk - tq)
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse[..., None].clamp_min(torch.finfo(torch.float32).min))
        o[:, :, start:end] = torch.einsum("kgqs,ksd->kgqd", probs, v32)
        lse[:, :, start:end] = chunk_lse
    return o.reshape(heads, tq, dim).to(q.dtype), lse.reshape(heads, tq)


def fused_attention_lse(kernel: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """One of FUSED_ATTENTION_BACKENDS, with the mask aligned bottom-right."""
    tq, tk = q.shape[1], k.shape[1]
    if not causal or tq == tk or kernel == "flash-attn":  # flash-attn aligns bottom-right itself
        return _KERNELS[kernel](q, k, v, causal)
    prefix = tk - tq
    o, lse = _KERNELS[kernel](q, k[:, :prefix], v[:, :prefix], False)
    o_own, lse_own = _KERNELS[kernel](q, k[:, prefix:], v[:, prefix:], True)
    return merge_into(o, lse, o_own, lse_own)


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    k, v = _kv_heads_for("cudnn", q, k, v)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q[None], k[None], v[None], None, True, 0.0, causal, False)
    return out[0][0], out[1][0].reshape(q.shape[:2]).float()


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    k, v = _kv_heads_for("flash", q, k, v)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, causal, False)
    return out[0][0], out[1][0].reshape(q.shape[:2]).float()


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # layout [B, T, H, D]; grouped-query heads natively

    o, lse, _ = flash_attn_func(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                causal=causal, return_attn_probs=True)
    return o[0].transpose(0, 1), lse[0].float()


_KERNELS = {"cudnn": _cudnn, "flash-attn": _flash_attn, "flash": _flash}


def _kv_heads_for(kernel: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k, v as the kernel takes them: as they are where it reads grouped-query heads itself,
    else repeated to one kv head per query head."""
    group = q.shape[0] // k.shape[0]
    if group == 1 or _native_gqa(kernel, q.device):
        return k, v
    return k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)


@functools.cache
def _native_gqa(kernel: str, device: torch.device) -> bool:
    q, k, v = probe_inputs(device)
    try:
        o, lse = _KERNELS[kernel](q, k, v, False)
    except RuntimeError:  # the kernel refuses fewer kv heads than query heads
        return False
    return agrees(o, lse, *exact_attention_lse(q, k, v, causal=False))


def probe_inputs(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A small grouped-query problem (4 heads over 2 kv heads) to try a kernel on."""
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
                 for shape in ((4, 64, 128), (2, 96, 128), (2, 96, 128)))


def agrees(o: Tensor, lse: Tensor, want_o: Tensor, want_lse: Tensor) -> bool:
    return bool(torch.allclose(o.float(), want_o.float(), atol=2e-2) and torch.allclose(lse, want_lse, atol=2e-2))
