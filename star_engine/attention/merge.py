"""The log-sum-exp merge of partial attention results over disjoint key sets: what lets
attention split over keys (ring steps, a bottom-right causal call made of two) be exact.
Across ranks the same merge runs inside comm.Communicator.gather_merge."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_into(o: Tensor, lse: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Merges (o2, lse2) into (o, lse), o [H, T, D], lse [H, T]: written into o (float32
    arithmetic, a few heads at a time so that the float32 copies stay small); returns
    (o, merged lse). No row may be empty (lse = -inf) in both."""
    merged_lse = torch.logaddexp(lse, lse2)
    step = max(1, (1 << 28) // max(1, o[0].numel()))
    for h in range(0, o.shape[0], step):
        rows = slice(h, h + step)
        w, w2 = (torch.exp(x[rows] - merged_lse[rows])[..., None] for x in (lse, lse2))
        o[rows] = o[rows].float() * w + o2[rows].float() * w2
    return o, merged_lse
