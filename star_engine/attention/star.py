"""Star Attention, phase 1: block-local context encoding with an anchor block.

The context is cut into blocks of `block_size` tokens, dealt to the ranks in order (rank r
gets blocks [r*n/W, (r+1)*n/W), so the query rank holds the last ones). Block 0 is encoded
alone with causal attention. Every other block b is encoded as [anchor ; b]: the anchor
(the first `anchor_size` tokens of block 0) keeps positions 0..anchor_size-1, the block its
true global positions, and only the block's own K/V is kept.

The anchor's K/V depends on the anchor tokens alone, so it is the same on every rank and
equal to the first anchor_size tokens of block 0's K/V. anchor_mode says where it comes
from: "recompute" (each rank that needs it computes it, once for all of its blocks) or
"broadcast" (the owner of block 0 sends it layer by layer; about half the phase-1 compute
when anchor_size == block_size). Both give the same numbers within float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch import Dist
from ..model import Transformer
from .base import Strategy
from .local import local_attention

ANCHOR_MODES = ("recompute", "broadcast")


@dataclass(frozen=True)
class StarLayout:
    """Blocks of one context and the rank that encodes each."""

    blocks: tuple[tuple[int, int], ...]  # [start, end) of each block
    owners: tuple[int, ...]  # rank of each block
    anchor_size: int

    def blocks_of(self, rank: int) -> list[int]:
        return [b for b, owner in enumerate(self.owners) if owner == rank]


def blocks_of_rank(rank: int, num_blocks: int, world: int) -> range:
    """Blocks dealt to `rank`: a contiguous run; the last rank always gets the last block."""
    return range(rank * num_blocks // world, (rank + 1) * num_blocks // world)


class StarAttention(Strategy):
    name = "star"

    def __init__(self, dist: Dist, comm: Communicator, block_size: int | None = None,
                 anchor_size: int | float | None = None, anchor_mode: str = "broadcast") -> None:
        """block_size in tokens (None: the context divided by the ranks); anchor_size in
        tokens if an int, as a fraction of the block if a float (None: the whole block)."""
        super().__init__(dist, comm)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        if isinstance(anchor_size, float):
            if not 0 < anchor_size <= 1:
                raise ValueError(f"anchor size as a fraction of the block must be in (0, 1], got {anchor_size}")
        elif anchor_size is not None and not 1 <= anchor_size <= (block_size or anchor_size):
            raise ValueError(f"anchor size must be in [1, block size {block_size}], got {anchor_size}")
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {anchor_mode!r}")
        self.block_size, self.anchor_size, self.anchor_mode = block_size, anchor_size, anchor_mode

    def describe(self) -> str:
        block = self.block_size or "context/ranks"
        anchor = (f"{self.anchor_size:g} of the block" if isinstance(self.anchor_size, float)
                  else self.anchor_size or "block")
        return f"star (block {block}, anchor {anchor}, anchor K/V by {self.anchor_mode})"

    def layout(self, context_len: int) -> StarLayout:
        """Without --block-size, one block per rank; the anchor is clipped to block 0."""
        size = self.block_size or max(1, -(-context_len // self.dist.world))
        blocks = tuple((s, min(s + size, context_len)) for s in range(0, context_len, size))
        tokens = (max(1, round(self.anchor_size * size)) if isinstance(self.anchor_size, float)
                  else self.anchor_size or size)
        anchor = min(tokens, blocks[0][1]) if blocks else 0
        owners = tuple(r for r in range(self.dist.world) for _ in blocks_of_rank(r, len(blocks), self.dist.world))
        return StarLayout(blocks, owners, anchor)

    def context_split(self, context_len: int) -> list[int]:
        layout = self.layout(context_len)
        split = [0] * self.dist.world
        for (start, end), owner in zip(layout.blocks, layout.owners):
            split[owner] += end - start
        return split

    def context_capacity(self, rank: int, max_context: int) -> int:
        if self.block_size is None:  # one block per rank, of ceil(context / ranks) tokens at most
            return -(-max_context // self.dist.world)
        # Counting every block as full bounds the query rank's short last block too.
        most_blocks = -(-max_context // self.block_size)
        world = self.dist.world
        return self.block_size * max(len(blocks_of_rank(rank, n, world)) for n in range(1, most_blocks + 1))

    def encode_context(self, model: Transformer, context_ids: Tensor, arena: _C.KVArena) -> None:
        layout = self.layout(len(context_ids))
        if not layout.blocks:
            return
        device, anchor = context_ids.device, layout.anchor_size
        mine = layout.blocks_of(self.dist.rank)
        broadcast = self.anchor_mode == "broadcast" and len(layout.blocks) > 1

        # Sequences this rank runs through the layers, block 0 (or the anchor) first so
        # that the anchor's K/V of a layer is known before the anchored blocks need it.
        seqs = [_Sequence(context_ids[s:e], torch.arange(s, e, device=device), stored=True, anchored=b != 0)
                for b in mine for s, e in [layout.blocks[b]]]
        needs_anchor = any(seq.anchored for seq in seqs)
        if needs_anchor and 0 not in mine and not broadcast:
            seqs.insert(0, _Sequence(context_ids[:anchor], torch.arange(anchor, device=device),
                                     stored=False, anchored=False))
        anchor_shape = (2, model.config.num_kv_heads, anchor, model.config.head_dim)

        hidden = [model.embed(seq.ids) for seq in seqs]
        ropes = [model.rope(seq.positions) for seq in seqs]
        for layer_idx, layer in enumerate(model.layers):
            anchor_kv = None
            for i, seq in enumerate(seqs):
                if seq.anchored:
                    continue
                q, k, v = layer.qkv(hidden[i], *ropes[i])
                if seq.stored:
                    arena.append(layer_idx, k, v)
                anchor_kv = torch.stack((k[:, :anchor], v[:, :anchor]))
                hidden[i] = layer.finish(hidden[i], local_attention(q, k, v, causal=True))
            if broadcast:
                if anchor_kv is None:
                    anchor_kv = torch.empty(anchor_shape, dtype=model.embed.weight.dtype, device=device)
                anchor_kv = self.comm.broadcast(anchor_kv.contiguous(), root=layout.owners[0])
            for i, seq in enumerate(seqs):
                if not seq.anchored:
                    continue
                q, k, v = layer.qkv(hidden[i], *ropes[i])
                arena.append(layer_idx, k, v)
                keys, values = torch.cat((anchor_kv[0], k), dim=1), torch.cat((anchor_kv[1], v), dim=1)
                hidden[i] = layer.finish(hidden[i], local_attention(q, keys, values, causal=True))


@dataclass(frozen=True)
class _Sequence:
    ids: Tensor
    positions: Tensor
    stored: bool  # its K/V goes to the arena (a block) or not (a recomputed anchor)
    anchored: bool  # attends over [anchor ; itself]
