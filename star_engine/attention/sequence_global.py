"""Phase 2, common to every strategy: sequence-global attention of the new tokens.

Each rank attends the new tokens' queries over its local K/V and gets (o, lse); one
gather_merge combines them into exact attention over the whole sequence. Non-query ranks
attend without a mask (every new token comes after all of their context); the query rank
first appends the new K/V, then attends causally (bottom-right aligned), so new token i
sees its whole local context and the new tokens up to i. Only the query rank stores the
new tokens' K/V.
"""

from __future__ import annotations

from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..model import Attend
from .local import append_at, decode_attention_at, local_attention_lse


def sequence_global_attention(arena: _C.KVArena, comm: Communicator, is_query_rank: bool) -> Attend:
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if is_query_rank:
            arena.append(layer, k, v)
        o, lse = local_attention_lse(q, arena.keys(layer), arena.values(layer), causal=is_query_rank)
        return comm.gather_merge(o, lse)[0]

    return attend


def sequence_global_decode(arena: _C.KVArena, comm: Communicator, is_query_rank: bool,
                           kv_length: Tensor) -> Attend:
    """The same attention for one new token, with this rank's KV length in a device tensor
    (int32 [1]; on the query rank it counts the new token already). Shapes never change
    from one token to the next, so that a whole decode step can be captured in a CUDA graph."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache_k, cache_v = arena.storage[layer, 0], arena.storage[layer, 1]
        if is_query_rank:
            append_at(cache_k, cache_v, k, v, kv_length)
        o, lse = decode_attention_at(q, cache_k, cache_v, kv_length)
        if comm.world == 1:
            return o  # already global, and 0 where there are no keys, as a merge would give
        return comm.gather_merge(o, lse)[0]

    return attend
