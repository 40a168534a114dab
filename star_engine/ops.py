"""The extension's kernels (csrc/, bound in `_C`) as the package calls them: one thin
function each, with its shapes. Only this module calls a kernel of `_C`; the classes it
binds (KVArena, NcclComm, PeerExchange) are used where they live. The GPU kernels exist
where the extension was built with CUDA (`WITH_CUDA`); the merge also runs on CPUs."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C

WITH_CUDA: bool = _C.WITH_CUDA


def lse_merge(o_parts: Tensor, lse_parts: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of W partial attention results: o_parts [W, rows, dim], lse_parts
    [W, rows] (float32, -inf for a part without keys) into o [rows, dim], lse [rows]."""
    return _C.lse_merge(o_parts, lse_parts)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * RMSNorm(x) over the last dimension, on a GPU, rounding as PyTorch's ops do."""
    return _C.rms_norm(x, weight, eps)


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotates x [tokens, heads, head_dim] in place (halves convention), in float32; cos,
    sin [tokens, head_dim] float32."""
    _C.rope_(x, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up [tokens, 2 * inner], on a GPU."""
    return _C.silu_mul(gate_up)


def decode_counters(rows: int, kv_heads: int, device: torch.device) -> Tensor:
    """The decode kernel's split counters for launches of up to `rows` rows: zeros, which
    every launch leaves at zero. Whoever captures a launch in a CUDA graph keeps them as
    long as the graph (its replays count in them)."""
    return torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, length: Tensor, splits: int,
                     counters: Tensor) -> tuple[Tensor, Tensor]:
    """One query token q [H, D] over a cache k, v [KV, >= length, D] (rows contiguous) of
    which the first `length` (int32 [1], on the GPU) keys count: o [H, D], lse [H].
    counters: decode_counters(1, KV)."""
    return _C.decode_attention(q, k, v, length, splits, counters)


def decode_attention_rows(q: Tensor, k_rows: Tensor, v_rows: Tensor, lengths: Tensor, capacities: Tensor,
                          first_keys: Tensor, kv_heads: int, splits: int, counters: Tensor) -> tuple[Tensor, Tensor]:
    """One token per row, q [H, rows, D], each row over its own cache: row r's layer of K and
    V starts at address k_rows[r], v_rows[r] ([KV, capacities[r], D] each), its int32
    length is at lengths[r], and it attends to keys first_keys[r] to that length (int64
    tensors [rows]). o [H, rows, D] and lse [H, rows], packed in one buffer as gather_merge
    sends it. counters: decode_counters(rows, kv_heads)."""
    return _C.decode_attention_rows(q, k_rows, v_rows, lengths, capacities, first_keys, kv_heads, splits, counters)


def shared_context_attention(q: Tensor, o: Tensor, lse: Tensor, k: Tensor, v: Tensor, capacities: Tensor,
                             lengths: Tensor, readers: Tensor, first_reader: Tensor, reader_rows: Tensor,
                             kv_heads: int, splits: int) -> None:
    """Merges into o [H, rows, D], lse [H, rows] (decode_attention_rows' output for q) each
    reader row's attention over the context it shares with others, which the kernel reads
    once for all its readers. Entry e (int64 k, v, capacities; int32 lengths, readers,
    first_reader, all [entries]): the first lengths[e] keys of the layer at k[e], v[e]
    ([KV, capacities[e], D]), read by the rows reader_rows[first_reader[e]:][:readers[e]]
    (int32 [rows]); at most 128 // (H // KV) readers an entry."""
    _C.shared_context_attention(q, o, lse, k, v, capacities, lengths, readers, first_reader, reader_rows,
                                kv_heads, splits)


def kv_append_rows(k: Tensor, v: Tensor, k_rows: Tensor, v_rows: Tensor, lengths: Tensor, capacities: Tensor) -> None:
    """Row r's token of k, v [KV, rows, D] into slot lengths[r] - 1 of its own cache (the
    addresses as for decode_attention_rows); a row whose slot is outside its cache is not
    written."""
    _C.kv_append_rows(k, v, k_rows, v_rows, lengths, capacities)


def add_token_rows(lengths: Tensor, active: Tensor) -> None:
    """Adds one to each of the first `active` (int32 [1] on the GPU) int32 lengths whose
    addresses `lengths` holds."""
    _C.add_token_rows(lengths, active)


def decode_splits(capacity: int, kv_heads: int, multiprocessors: int, rows: int = 1) -> int:
    """The decode kernel's split count for caches of up to `capacity` keys: rows x kv_heads
    x splits blocks fill the multiprocessors once."""
    return _C.decode_splits(capacity, kv_heads, multiprocessors, rows)
