"""Attention of one new token over a layer of the KV arena, for decoding: on a GPU the
extension's split-KV kernel, which reads the length from the arena's device tensor, so
that a decode step can be captured in a CUDA graph and replayed as the cache grows."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _C
from .local import local_attention_lse


def decode_kernel_serves(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> bool:
    """Whether the split-KV decode kernel serves this shape (else decoding runs eagerly)."""
    return (device.type == "cuda" and _C.WITH_CUDA and dtype in (torch.float16, torch.bfloat16)
            and head_dim in (64, 128) and heads % kv_heads == 0 and heads // kv_heads <= 8)


def decode_attention(q: Tensor, arena: _C.KVArena, layer: int) -> tuple[Tensor, Tensor]:
    """q [H, 1, D] over the keys the arena counts while decoding: o [H, 1, D], lse [H, 1]."""
    heads, _, dim = q.shape
    keys, values = arena.slots(layer)
    kv_heads, capacity, _ = keys.shape
    if decode_kernel_serves(heads, kv_heads, dim, q.dtype, q.device):
        splits = _decode_splits(q.device, capacity, kv_heads)
        o, lse = _C.decode_attention(q[:, 0], keys, values, arena.device_length, splits)
        return o[:, None], lse[:, None]
    n = int(arena.device_length)
    return local_attention_lse(q, keys[:, :n], values[:, :n], causal=False)


@functools.cache
def _decode_splits(device: torch.device, capacity: int, kv_heads: int) -> int:
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return _C.decode_splits(capacity, kv_heads, multiprocessors)
