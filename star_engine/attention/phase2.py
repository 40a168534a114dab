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
from .decode import DecodeRows
from .local import local_attention_lse


def query_attention(arena: _C.KVArena, comm: Communicator, is_query_rank: bool,
                    prefix: tuple[_C.KVArena, int] | None = None) -> Attend:
    """For a pass of several new tokens (the query). prefix: (arena, length), the first
    keys of another arena, where the request reads a context that arena holds; its own
    arena then holds only what comes after."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if is_query_rank:
            arena.append(layer, k, v)
        keys, values = arena.keys(layer), arena.values(layer)
        if prefix is not None:
            context, length = prefix  # its slots: the holder may be decoding
            context_keys, context_values = context.slots(layer)
            keys = torch.cat((context_keys[:, :length], keys), 1)
            values = torch.cat((context_values[:, :length], values), 1)
        o, lse = local_attention_lse(q, keys, values, causal=is_query_rank)
        return comm.gather_merge(o, lse)[0]

    return attend


def token_attention(rows: DecodeRows, comm: Communicator, is_query_rank: bool) -> Attend:
    """For a pass of one new token of each request that `rows` holds (row i over its
    arena) while their arenas are decoding (the query rank has counted each token's slot
    already). Shapes never change from one token to the next, so that a whole decode step
    can be captured in a CUDA graph. All rows go through one gather_merge."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if is_query_rank:
            rows.write_token(layer, k, v)
        o, lse = rows.attend(layer, q)
        if comm.world == 1:
            return o  # already global, and 0 where there are no keys, as a merge would give
        return comm.gather_merge(o, lse)[0]

    return attend
