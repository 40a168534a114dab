"""Ring Attention baseline, phase 1: exact causal attention with the context spread over
the ranks and K/V passed around a ring.

The context is cut into 2W chunks; rank r holds chunks r and 2W-1-r (the zigzag split), so
that every rank has as much causal work as every other. At every layer each rank computes
its tokens' q, k, v, then for W steps attends its queries over the K/V block in hand while
that block travels on to the next rank; partial results are merged with the log-sum-exp
merge. Each rank keeps its own tokens' K/V for phase 2, which is the same as star's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _C
from ..model import Transformer
from .base import ContextLayout, Strategy
from .local import local_attention_lse
from .merge import merge_into


def zigzag_chunks(context_len: int, world: int) -> list[list[tuple[int, int]]]:
    """[start, end) of the two chunks of each rank: chunk r and chunk 2W-1-r of 2W."""
    bounds = [i * context_len // (2 * world) for i in range(2 * world + 1)]
    chunk = [(bounds[i], bounds[i + 1]) for i in range(2 * world)]
    return [[chunk[r], chunk[2 * world - 1 - r]] for r in range(world)]


@dataclass(frozen=True)
class RingLayout(ContextLayout):
    spans: tuple[tuple[tuple[int, int], ...], ...]  # by rank: [start, end) of its two chunks


class RingAttention(Strategy):
    name = "ring"

    def layout(self, context_len: int) -> RingLayout:
        spans = tuple(tuple(pair) for pair in zigzag_chunks(context_len, self.place.world))
        kept = tuple(sum(end - start for start, end in pair) for pair in spans)
        # A rank attends each other rank's chunks in turn.
        received = tuple(max((k for r, k in enumerate(kept) if r != rank), default=0) for rank in range(len(kept)))
        return RingLayout(context_len, kept=kept, encoded=kept, received=received, spans=spans)

    def context_capacity(self, rank: int, max_context: int) -> int:
        return 2 * -(-max_context // (2 * self.place.world))  # two chunks, each at most c / 2W rounded up

    def encode_context(self, model: Transformer, context_ids: Tensor, layout: RingLayout,
                       arena: _C.KVArena, query_ids: Tensor | None = None) -> None:
        if len(context_ids) == 0:
            return
        spans = layout.spans
        positions = torch.cat([torch.arange(s, e, device=context_ids.device) for s, e in spans[self.place.rank]])
        x = model.embed_tokens(context_ids[positions])
        cos, sin = model.rope(positions)
        for layer_idx, layer in enumerate(model.layers):
            q, k, v = layer.qkv(x, cos, sin)
            arena.append(layer_idx, k, v)
            x = layer.finish(x, self._ring_attention(q, k, v, spans))

    def _ring_attention(self, q: Tensor, k: Tensor, v: Tensor, spans: tuple) -> Tensor:
        rank, world = self.place.rank, self.place.world
        heads, tokens, dim = q.shape
        o = torch.zeros(heads, tokens, dim, dtype=torch.float32, device=q.device)
        lse = torch.full((heads, tokens), float("-inf"), dtype=torch.float32, device=q.device)
        block = torch.stack((k, v)).contiguous()  # [2, KV, tokens of its rank, D]
        for step in range(world):
            owner = (rank - step) % world  # whose tokens the block in hand holds
            complete = None
            if step < world - 1:  # pass the block on while attending over it
                sender = (rank - step - 1) % world
                incoming = block.new_empty(2, k.shape[0], sum(e - s for s, e in spans[sender]), dim)
                complete = self.comm.start_send_recv(block, (rank + 1) % world, incoming, (rank - 1) % world)
            self._attend_block(q, block, spans[rank], spans[owner], o, lse)
            if complete is not None:
                block = complete()
        return o.to(q.dtype)

    @staticmethod
    def _attend_block(q: Tensor, block: Tensor, q_spans: tuple, k_spans: tuple, o: Tensor, lse: Tensor) -> None:
        """Merges into (o, lse) the attention of this rank's queries over one rank's K/V,
        chunk by chunk: a key chunk before the query chunk is seen whole, the same chunk
        causally, a later one not at all."""
        q_offset = 0
        for q_start, q_end in q_spans:
            k_offset = 0
            rows = slice(q_offset, q_offset + q_end - q_start)
            for k_start, k_end in k_spans:
                keys = slice(k_offset, k_offset + k_end - k_start)
                k_offset += k_end - k_start
                if k_start > q_start or q_end == q_start or k_end == k_start:
                    continue  # a later chunk (or an empty one)
                part_o, part_lse = local_attention_lse(q[:, rows], block[0][:, keys], block[1][:, keys],
                                                       causal=k_start == q_start)
                lse[:, rows] = merge_into(o[:, rows], lse[:, rows], part_o, part_lse)[1]
            q_offset += q_end - q_start
