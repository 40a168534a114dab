"""Attention of a rank's queries over its local keys, with the log-sum-exp.

Every strategy is built on this one function: the LSE is what lets partial results over
disjoint key sets be merged exactly (see comm.Communicator.gather_merge).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bound on the score matrix of one query chunk (elements), to keep long contexts in memory.
_MAX_SCORES = 1 << 26


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention of q [H, Tq, D] over k, v [KV, Tk, D] (H a multiple of KV).

    causal: query i sits at key position Tk - Tq + i and sees keys up to it (the causal
    mask aligned bottom-right: new tokens placed after the keys already there).
    Returns o [H, Tq, D] in q's dtype and lse [H, Tq] in float32 (natural log); a query
    that sees no key gets o = 0 and lse = -inf.
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
