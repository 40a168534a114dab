"""Attention of a rank's queries over its local keys.

Shapes: q [H, Tq, D], k and v [KV, Tk, D], H a multiple of KV (grouped-query heads).
`causal` aligns the mask bottom-right: query i sits at key position Tk - Tq + i and sees
the keys up to it, as new tokens placed after the keys already there.

local_attention_lse also returns the log-sum-exp, which is what lets partial results over
disjoint key sets be merged exactly (see comm.Communicator.gather_merge).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .. import _C

# Bound on the score matrix of one query chunk (elements), to keep long contexts in memory.
_MAX_SCORES = 1 << 26


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Softmax attention output o [H, Tq, D] through PyTorch's fused kernels (no LSE)."""
    mask = causal_lower_right(q.shape[1], k.shape[1]) if causal and q.shape[1] != k.shape[1] else None
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          is_causal=causal and mask is None, enable_gqa=True)[0]


def local_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention o [H, Tq, D] (q's dtype) and its lse [H, Tq] (float32, natural log).

    A query that sees no key gets o = 0 and lse = -inf.
    """
    heads, tq, dim = q.shape
    kv_heads, tk, _ = k.shape
    if tk == 0:
        return q.new_zeros(q.shape), q.new_full((heads, tq), float("-inf"), dtype=torch.float32)
    group = heads // kv_heads
    scale = dim ** -0.5
    # Exact path: float32 arithmetic, query-chunked so the scores stay bounded.
    qg = q.float().reshape(kv_heads, group, tq, dim)
    k32, v32 = k.float(), v.float()
    o = torch.empty(kv_heads, group, tq, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(kv_heads, group, tq, dtype=torch.float32, device=q.device)
    chunk = max(1, _MAX_SCORES // (heads * tk))
    key_pos = torch.arange(tk, device=q.device)
    for start in range(0, tq, chunk):
        end = min(tq, start + chunk)
        scores = torch.einsum("kgqd,ksd->kgqs", qg[:, :, start:end], k32) * scale
        if causal:
            query_pos = torch.arange(start, end, device=q.device) + (tk - tq)
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse[..., None].clamp_min(torch.finfo(torch.float32).min))
        o[:, :, start:end] = torch.einsum("kgqs,ksd->kgqd", probs, v32)
        lse[:, :, start:end] = chunk_lse
    return o.reshape(heads, tq, dim).to(q.dtype), lse.reshape(heads, tq)


def decode_kernel_fits(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the extension's split-KV decode kernel serves this shape."""
    return (device.type == "cuda" and _C.WITH_CUDA and dtype in (torch.float16, torch.bfloat16)
            and head_dim in (64, 128) and heads % kv_heads == 0 and heads // kv_heads <= 8)


def append_at(cache_k: Tensor, cache_v: Tensor, k: Tensor, v: Tensor, length: Tensor) -> None:
    """Writes one token's k, v [KV, 1, D] at slot length - 1 of a cache layer [KV, capacity, D];
    `length` is an int32 tensor [1] on the cache's device (read there on a GPU)."""
    if cache_k.is_cuda:
        _C.kv_append(cache_k, cache_v, k, v, length)
    else:
        slot = int(length) - 1
        cache_k[:, slot] = k[:, 0]
        cache_v[:, slot] = v[:, 0]


def decode_attention_at(q: Tensor, cache_k: Tensor, cache_v: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of one token q [H, 1, D] over the first `length` keys of a cache layer
    [KV, capacity, D]: o [H, 1, D], lse [H, 1]. On a GPU the length is read on the device, so
    the call can be captured in a CUDA graph and replayed as the cache grows."""
    heads, _, dim = q.shape
    kv_heads, capacity, _ = cache_k.shape
    if decode_kernel_fits(heads, kv_heads, dim, q.dtype, q.device):
        splits = _decode_splits(q.device, capacity, kv_heads)
        o, lse = _C.decode_attention(q[:, 0], cache_k, cache_v, length, splits)
        return o[:, None], lse[:, None]
    n = int(length)
    return local_attention_lse(q, cache_k[:, :n], cache_v[:, :n], causal=False)


@functools.cache
def _decode_splits(device: torch.device, capacity: int, kv_heads: int) -> int:
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return _C.decode_splits(capacity, kv_heads, multiprocessors)
