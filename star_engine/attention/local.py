"""Attention of a rank's queries over its local keys.

Shapes: q [H, Tq, D], k and v [KV, Tk, D], H a multiple of KV (grouped-query heads).
`causal` aligns the mask bottom-right: query i sits at key position Tk - Tq + i and sees
the keys up to it, as new tokens placed after the keys already there.

local_attention_lse also returns the log-sum-exp, which is what lets partial results over
disjoint key sets be merged exactly (see comm.Communicator.gather_merge).

Backends (set_backend; "auto" picks the first that serves the device and dtype):
  cudnn       cuDNN's fused attention through PyTorch (GPU, fp16/bf16)
  flash-attn  the flash-attn package, when installed (GPU, fp16/bf16)
  flash       PyTorch's FlashAttention-2 kernel (GPU, fp16/bf16)
  torch       PyTorch's scaled_dot_product_attention, and exact float32 arithmetic where
              the log-sum-exp is needed: CPUs, float32, and the reference for the others
PyTorch's fused kernels align a causal mask top-left, so a bottom-right causal call with
Tq < Tk runs as two: the queries over the first Tk - Tq keys (no mask) and over the last
Tq keys (square causal), merged by log-sum-exp.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .. import _C

BACKENDS = ("auto", "cudnn", "flash-attn", "flash", "torch")
_FUSED = ("cudnn", "flash-attn", "flash")
_backend = "auto"

# Bound on the score matrix of one query chunk (elements), to keep long contexts in memory.
_MAX_SCORES = 1 << 26


def set_backend(name: str) -> None:
    """Chooses the attention backend of this process (one of BACKENDS)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "flash-attn" and not _has_flash_attn():
        raise ValueError("attention backend flash-attn: the flash-attn package is not installed")
    global _backend
    _backend = name


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves tensors of this device and dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        if _backend not in ("auto", "torch"):
            raise ValueError(f"attention backend {_backend} needs float16 or bfloat16 tensors on a GPU")
        return "torch"
    if _backend != "auto":
        return _backend
    for name in _FUSED:
        if _works(name, device):
            return name
    return "torch"


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Softmax attention output o [H, Tq, D] (q's dtype)."""
    backend = backend_for(q.device, q.dtype)
    if backend == "torch":
        mask = causal_lower_right(q.shape[1], k.shape[1]) if causal and q.shape[1] != k.shape[1] else None
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                              is_causal=causal and mask is None, enable_gqa=True)[0]
    return _fused_lse(backend, q, k, v, causal)[0]


def local_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention o [H, Tq, D] (q's dtype) and its lse [H, Tq] (float32, natural log).

    A query that sees no key gets o = 0 and lse = -inf.
    """
    if k.shape[1] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32)
    backend = backend_for(q.device, q.dtype)
    if backend == "torch":
        return _exact_lse(q, k, v, causal)
    return _fused_lse(backend, q, k, v, causal)


def _exact_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    heads, tq, dim = q.shape
    kv_heads, tk, _ = k.shape
    group = heads // kv_heads
    # float32 arithmetic, query-chunked so that the scores stay bounded.
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


def _fused_lse(backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    tq, tk = q.shape[1], k.shape[1]
    if not causal or tq == tk or backend == "flash-attn":  # flash-attn aligns bottom-right itself
        return _KERNELS[backend](q, k, v, causal)
    prefix = tk - tq
    o, lse = _KERNELS[backend](q, k[:, :prefix], v[:, :prefix], False)
    o_own, lse_own = _KERNELS[backend](q, k[:, prefix:], v[:, prefix:], True)
    return merge_into(o, lse, o_own, lse_own)


def merge_into(o: Tensor, lse: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """The log-sum-exp merge of partial results (o, lse) and (o2, lse2) over disjoint keys,
    o [H, T, D], lse [H, T]: written into o (float32 arithmetic, a few heads at a time so
    that the float32 copies stay small); returns (o, merged lse). No row may be empty
    (lse = -inf) in both."""
    merged_lse = torch.logaddexp(lse, lse2)
    step = max(1, (1 << 28) // max(1, o[0].numel()))
    for h in range(0, o.shape[0], step):
        rows = slice(h, h + step)
        w, w2 = (torch.exp(x[rows] - merged_lse[rows])[..., None] for x in (lse, lse2))
        o[rows] = o[rows].float() * w + o2[rows].float() * w2
    return o, merged_lse


def _cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    k, v = _kv_heads_for("cudnn", q, k, v)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q[None], k[None], v[None], None, True, 0.0, causal, False)
    return out[0][0], out[1][0].reshape(q.shape[:2]).float()


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    k, v = _kv_heads_for("flash", q, k, v)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, causal, False)
    return out[0][0], out[1][0].reshape(q.shape[:2]).float()


def _kv_heads_for(backend: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k, v as the kernel takes them: as they are where it reads grouped-query heads itself,
    else repeated to one kv head per query head."""
    group = q.shape[0] // k.shape[0]
    if group == 1 or _native_gqa(backend, q.device):
        return k, v
    return k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)


@functools.cache
def _native_gqa(backend: str, device: torch.device) -> bool:
    q, k, v = _probe_inputs(device)
    try:
        o, lse = _KERNELS[backend](q, k, v, False)
    except RuntimeError:  # the kernel refuses fewer kv heads than query heads
        return False
    return _agrees(o, lse, *_exact_lse(q, k, v, causal=False))


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # layout [B, T, H, D]; grouped-query heads natively

    o, lse, _ = flash_attn_func(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                causal=causal, return_attn_probs=True)
    return o[0].transpose(0, 1), lse[0].float()


_KERNELS = {"cudnn": _cudnn, "flash-attn": _flash_attn, "flash": _flash}


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _works(backend: str, device: torch.device) -> bool:
    """Whether a fused backend runs here and agrees with the exact path on a small problem."""
    if backend == "flash-attn" and not _has_flash_attn():
        return False
    q, k, v = _probe_inputs(device)
    try:
        o, lse = _fused_lse(backend, q, k[:, 20:], v[:, 20:], causal=True)
    except RuntimeError:
        return False
    return _agrees(o, lse, *_exact_lse(q, k[:, 20:], v[:, 20:], causal=True))


def _probe_inputs(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
                 for shape in ((4, 64, 128), (2, 96, 128), (2, 96, 128)))


def _agrees(o: Tensor, lse: Tensor, want_o: Tensor, want_lse: Tensor) -> bool:
    return bool(torch.allclose(o.float(), want_o.float(), atol=2e-2) and torch.allclose(lse, want_lse, atol=2e-2))


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
