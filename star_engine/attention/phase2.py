"""Phase 2, the same for every strategy: sequence-global attention of the query and the
generated tokens.

Each rank attends the new tokens' queries over its local K/V and gets (o, lse); one
gather_merge combines them into exact attention over the whole sequence. Non-query ranks
attend without a mask (every new token comes after all of their context); the query rank
first stores the new K/V, then attends causally (bottom-right aligned), so new token i
sees its whole local context and the new tokens up to i. Only the query rank stores the
new tokens' K/V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..model import Attend
from .decode import decode_attention
from .local import local_attention_lse


def query_attention(arena: _C.KVArena, comm: Communicator, is_query_rank: bool) -> Attend:
    """For a pass of several new tokens (the query)."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if is_query_rank:
            arena.append(layer, k, v)
        o, lse = local_attention_lse(q, arena.keys(layer), arena.values(layer), causal=is_query_rank)
        return comm.gather_merge(o, lse)[0]

    return attend


def token_attention(arenas: list[_C.KVArena], comm: Communicator, is_query_rank: bool) -> Attend:
    """For a pass of one new token of each of several requests (row i of request i, over
    arenas[i]) while the arenas are decoding (the query rank has counted each token's slot
    already). Shapes never change from one token to the next, so that a whole decode step
    can be captured in a CUDA graph. All rows go through one gather_merge."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rows = []
        for i, arena in enumerate(arenas):
            if is_query_rank:
                arena.write_token(layer, k[:, i:i + 1], v[:, i:i + 1])
            rows.append(decode_attention(q[:, i:i + 1], arena, layer))
        if len(rows) == 1:
            o, lse = rows[0]
        else:
            o, lse = torch.cat([row[0] for row in rows], 1), torch.cat([row[1] for row in rows], 1)
        if comm.world == 1:
            return o  # already global, and 0 where there are no keys, as a merge would give
        return comm.gather_merge(o, lse)[0]

    return attend
