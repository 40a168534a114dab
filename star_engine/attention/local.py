"""Attention of a rank's queries over its local keys, through the backend chosen for the
device (backends.py).

Shapes: q [H, Tq, D], k and v [KV, Tk, D], H a multiple of KV (grouped-query heads).
`causal` aligns the mask bottom-right: query i sits at key position Tk - Tq + i and sees
the keys up to it, as new tokens placed after the keys already there.

local_attention_lse also returns the log-sum-exp, which is what lets partial results over
disjoint key sets be merged exactly (merge.py, and comm.Communicator.gather_merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import backend_for
from .kernels import exact_attention_lse, fused_attention_lse


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Softmax attention output o [H, Tq, D] (q's dtype)."""
    backend = backend_for(q.device, q.dtype)
    if backend == "torch":
        tq, tk = q.shape[1], k.shape[1]
        mask = None
        # A single query sees every key; as many queries as keys is is_causal's square.
        if causal and tq > 1 and tq != tk:
            if q.is_cuda:  # a mask PyTorch's GPU kernels apply without holding it in memory
                # Imported here: the module loads torch's compiler stack (a second per process).
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(tq, tk)
            else:  # what causal_lower_right becomes on the CPU, without that import
                mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                              is_causal=causal and tq == tk, enable_gqa=True)[0]
    return fused_attention_lse(backend, q, k, v, causal)[0]


def local_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention o [H, Tq, D] (q's dtype) and its lse [H, Tq] (float32, natural log).

    A query that sees no key gets o = 0 and lse = -inf.
    """
    if k.shape[1] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32)
    backend = backend_for(q.device, q.dtype)
    if backend == "torch":
        return exact_attention_lse(q, k, v, causal)
    return fused_attention_lse(backend, q, k, v, causal)
