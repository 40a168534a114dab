"""Star Attention, phase 1: block-local context encoding with an anchor block.

The context is cut into blocks, either of `block_size` tokens or into `blocks` blocks of
equal size (default: one per rank), dealt to the ranks in order (rank r gets blocks
[r*n/W, (r+1)*n/W), so the query rank holds the last ones). Block 0 is encoded alone with
causal attention. Every other block b is encoded as [anchor ; b]: the anchor (the first
tokens of block 0, `anchor_tokens` of them or `anchor_fraction` of a block; default the
whole block) keeps positions 0.., the block its true global positions, and only the
block's own K/V is kept.

The anchor's K/V depends on the anchor tokens alone, so it is the same on every rank and
equal to the start of block 0's K/V. anchor_mode says where it comes from: "recompute"
(each rank that needs it computes it, once for all of its blocks) or "broadcast" (the owner
of block 0 sends it layer by layer; about half the phase-1 compute when the anchor is the
whole block). Both give the same numbers within float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch import Dist
from ..model import Transformer
from .base import ContextLayout, Strategy
from .local import local_attention

ANCHOR_MODES = ("recompute", "broadcast")


@dataclass(frozen=True)
class StarLayout(ContextLayout):
    blocks: tuple[tuple[int, int], ...]  # [start, end) of each block
    owners: tuple[int, ...]  # rank of each block
    anchor_size: int  # tokens

    def blocks_of(self, rank: int) -> list[int]:
        return [b for b, owner in enumerate(self.owners) if owner == rank]


def check_star_settings(block_size: int | None, blocks: int | None, anchor_tokens: int | None,
                        anchor_fraction: float | None, anchor_mode: str) -> None:
    """Raises ValueError, naming the setting, unless the settings make a layout."""
    if block_size is not None and blocks is not None:
        raise ValueError("give the block size in tokens or the number of blocks, not both")
    if anchor_tokens is not None and anchor_fraction is not None:
        raise ValueError("give the anchor in tokens or as a fraction of the block, not both")
    for name, value in (("block size", block_size), ("number of blocks", blocks), ("anchor", anchor_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if anchor_fraction is not None and not 0 < anchor_fraction <= 1:
        raise ValueError(f"anchor as a fraction of the block must be in (0, 1], got {anchor_fraction}")
    if anchor_tokens is not None and block_size is not None and anchor_tokens > block_size:
        raise ValueError(f"anchor of {anchor_tokens} tokens exceeds the block size {block_size}")
    if anchor_mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode must be one of {', '.join(ANCHOR_MODES)}, got {anchor_mode!r}")


def block_tokens(context_len: int, block_size: int | None, blocks: int) -> int:
    """Tokens per block (the last may be shorter): block_size, else the context cut into
    `blocks` blocks."""
    return block_size or max(1, -(-context_len // blocks))


def blocks_of_rank(rank: int, num_blocks: int, world: int) -> range:
    """Blocks dealt to `rank`: a contiguous run; the last rank always gets the last block."""
    return range(rank * num_blocks // world, (rank + 1) * num_blocks // world)


class StarAttention(Strategy):
    name = "star"

    def __init__(self, dist: Dist, comm: Communicator, *, block_size: int | None = None,
                 blocks: int | None = None, anchor_tokens: int | None = None,
                 anchor_fraction: float | None = None, anchor_mode: str = "broadcast") -> None:
        """At most one of block_size (tokens) and blocks (a count); at most one of
        anchor_tokens and anchor_fraction (of a block, in (0, 1])."""
        super().__init__(dist, comm)
        check_star_settings(block_size, blocks, anchor_tokens, anchor_fraction, anchor_mode)
        self.block_size, self.blocks = block_size, blocks
        self.anchor_tokens, self.anchor_fraction, self.anchor_mode = anchor_tokens, anchor_fraction, anchor_mode

    def describe(self) -> str:
        block = (f"{self.block_size} tokens" if self.block_size else
                 f"context/{self.blocks}" if self.blocks else "context/ranks")
        anchor = (f"{self.anchor_tokens} tokens" if self.anchor_tokens else
                  f"{self.anchor_fraction:g} of the block" if self.anchor_fraction else "the block")
        return f"star (block {block}, anchor {anchor}, anchor K/V by {self.anchor_mode})"

    def layout(self, context_len: int) -> StarLayout:
        """The anchor is clipped to block 0."""
        world = self.dist.world
        size = block_tokens(context_len, self.block_size, self.blocks or world)
        blocks = tuple((s, min(s + size, context_len)) for s in range(0, context_len, size))
        tokens = self.anchor_tokens or (max(1, round(self.anchor_fraction * size)) if self.anchor_fraction else size)
        anchor = min(tokens, blocks[0][1]) if blocks else 0
        owners = tuple(r for r in range(world) for _ in blocks_of_rank(r, len(blocks), world))
        kept, encoded = [0] * world, [0] * world
        for (start, end), owner in zip(blocks, owners):
            kept[owner] += end - start
        for rank in range(world):
            mine = [b for b, owner in enumerate(owners) if owner == rank]
            recomputes_anchor = self._recomputes_anchor(len(blocks)) and mine and 0 not in mine
            encoded[rank] = kept[rank] + (anchor if recomputes_anchor else 0)
        return StarLayout(context_len, kept=tuple(kept), encoded=tuple(encoded), blocks=blocks, owners=owners,
                          anchor_size=anchor)

    def _recomputes_anchor(self, num_blocks: int) -> bool:
        """Whether ranks without block 0 compute the anchor's K/V themselves."""
        return self.anchor_mode == "recompute" or num_blocks == 1

    def context_capacity(self, rank: int, max_context: int) -> int:
        world = self.dist.world
        if self.block_size is None:  # n blocks (at most) of ceil(context / n) tokens at most
            n = self.blocks or world
            size, most_blocks = -(-max_context // n), n
        else:  # counting every block as full bounds the query rank's short last block too
            size, most_blocks = self.block_size, -(-max_context // self.block_size)
        return size * max(len(blocks_of_rank(rank, n, world)) for n in range(1, most_blocks + 1))

    def encode_context(self, model: Transformer, context_ids: Tensor, layout: StarLayout,
                       arena: _C.KVArena) -> None:
        if not layout.blocks:
            return
        device, anchor = context_ids.device, layout.anchor_size
        mine = layout.blocks_of(self.dist.rank)
        broadcast = not self._recomputes_anchor(len(layout.blocks))

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
