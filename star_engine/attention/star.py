"""Star Attention, phase 1: block-local context encoding with an anchor block.

The context is cut into blocks, either of `block_size` tokens or into `blocks` blocks of
equal size (default: one per rank), dealt to the ranks in order (rank r gets blocks
[r*n/W, (r+1)*n/W), so the query rank holds the last ones). Block 0 is encoded alone with
causal attention. Every other block b is encoded as [anchor ; b]: the anchor (the first
tokens of block 0, `anchor_tokens` of them or `anchor_fraction` of a block; default the
whole block) keeps positions 0.., the block its true global positions, and only the
block's own K/V is kept.

With layout "balanced" the blocks other than block 0 are equal and block 0 is longer, as
long as it takes for its work (its causal square and per-token work, weighed by the
device's measured rates: costs.py) to equal that of another block (which also attends the
anchor); blocks of equal work, dealt in equal numbers, keep every rank equally busy. The
anchor is then measured in the other blocks' size.

Two options change what a block other than block 0 is encoded after (both off: the
algorithm as published). `window_tokens` W (or `window_fraction` of a block, measured as
the anchor is): the W context tokens just before the block (those after the anchor) come
between the anchor and the block, at their own positions, so that a block sees the text it
continues; with a small anchor (the attention sink) this is the "sink plus local window"
prefix. window_mode "encode" runs those tokens through the layers again with the block;
"pass" takes their K/V, layer by layer, from the encoding of the block they belong to (the
previous one; its owner sends it, one message a layer), so the window costs only the
block's attention over it, and reaches back only as far as the previous block's start;
through that K/V a block also sees what the previous one saw. `anchor_query`: the
request's question comes first, before the anchor (at the positions just before 0; the
anchor's K/V stays the one computed without it), so that every block is encoded knowing
what is asked; block 0, encoded alone, does not see it, and the context's K/V then belongs
to that one question (engine.py encodes the context again for another). The prefix
tokens are run through the layers with their block and not kept.

`recompute_fraction` r: after phase 1, the K/V of the fraction r of the tokens outside
block 0 that phase 1 got most wrong is recomputed exactly over the whole context
(CacheBlend's selective recompute: recompute.py).

`block_temperature` T calibrates phase 2's merge of the blocks (the attention temperature
of APE, Yang et al., ICLR 2025, for contexts encoded in parallel): the keys that a block
other than block 0 keeps are divided by T, so that the query's and the new tokens' logits
over them are divided by T and each such block draws the attention mass that temperature
gives it against block 0's exact K/V and the tokens after the context. T = 1: unchanged.

The anchor's K/V depends on the anchor tokens alone, so it is the same on every rank and
equal to the start of block 0's K/V. anchor_mode says where it comes from: "recompute"
(each rank that needs it computes it, once for all of its blocks) or "broadcast" (the owner
of block 0 sends it layer by layer; about half the phase-1 compute when the anchor is the
whole block). Both give the same numbers within float tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch.control import Place
from ..model import Transformer
from ..names import DEFAULT_ANCHOR_MODE, PUBLISHED_STAR_LAYOUT, PUBLISHED_WINDOW_MODE
from .spec import check_star_settings, fraction_text
from .base import ContextLayout, Strategy
from .local import local_attention
from .recompute import recompute_context


@dataclass(frozen=True)
class StarLayout(ContextLayout):
    blocks: tuple[tuple[int, int], ...]  # [start, end) of each block
    owners: tuple[int, ...]  # rank of each block
    anchor_size: int  # tokens
    window_tokens: int = 0  # most context tokens before a block that precede it in its prefix
    window_passed: bool = False  # the window's K/V is the previous block's, passed on

    def window(self, block: int) -> tuple[int, int]:
        """[start, end) of the context tokens between the anchor and `block` that its prefix
        holds; a window passed on lies within the previous block."""
        start = self.blocks[block][0]
        earliest = self.blocks[block - 1][0] if self.window_passed and block > 0 else 0
        return max(self.anchor_size, earliest, start - self.window_tokens), start

    def blocks_of(self, rank: int) -> list[int]:
        return [b for b, owner in enumerate(self.owners) if owner == rank]


def block_tokens(context_len: int, block_size: int | None, blocks: int) -> int:
    """Tokens per block (the last may be shorter): block_size, else the context cut into
    `blocks` blocks."""
    return block_size or max(1, -(-context_len // blocks))


def block_work(tokens: int, anchor: int, token_weight: float) -> float:
    """Phase-1 work of a block, in attention pairs: its causal square, the anchor's keys for
    each of its tokens (anchor 0 for block 0), and its tokens' per-token work."""
    return tokens * (tokens + 1) / 2 + tokens * anchor + token_weight * tokens


def anchored_block_shape(tokens: int, anchor: int, window: int, window_passed: bool) -> tuple[int, int]:
    """Phase 1 of a block other than block 0: the tokens run through the layers, and the
    keys before them that each attends. A window encoded again runs with the block after
    the anchor; a window passed on is only keys."""
    return (tokens, anchor + window) if window_passed else (tokens + window, anchor)


def first_block_tokens(work: float, token_weight: float) -> int:
    """The fewest tokens block 0 needs for at least `work` (block_work(x, 0, w) >= work)."""
    slope = 1 + 2 * token_weight  # x^2 + slope x - 2 work >= 0
    x = max(1, math.ceil((-slope + math.sqrt(slope * slope + 8 * work)) / 2))
    while x > 1 and block_work(x - 1, 0, token_weight) >= work:  # float rounding, either way
        x -= 1
    while block_work(x, 0, token_weight) < work:
        x += 1
    return x


def blocks_of_rank(rank: int, num_blocks: int, world: int) -> range:
    """Blocks dealt to `rank`: a contiguous run; the last rank always gets the last block."""
    return range(rank * num_blocks // world, (rank + 1) * num_blocks // world)


class StarAttention(Strategy):
    name = "star"

    def __init__(self, place: Place, comm: Communicator | None, *, block_size: int | None = None,
                 blocks: int | None = None, anchor_tokens: int | None = None,
                 anchor_fraction: float | None = None, anchor_mode: str = DEFAULT_ANCHOR_MODE,
                 layout: str = PUBLISHED_STAR_LAYOUT, token_weight: float = 0.0, window_tokens: int = 0,
                 window_fraction: float | None = None, window_mode: str = PUBLISHED_WINDOW_MODE,
                 anchor_query: bool = False, block_temperature: float = 1.0,
                 recompute_fraction: float = 0.0) -> None:
        """At most one of block_size (tokens) and blocks (a count); at most one of
        anchor_tokens and anchor_fraction (of a block, in (0, 1]). token_weight: attention
        pairs as costly as one token's per-token work (costs.token_weight), which the
        balanced layout weighs block 0 with. window_tokens or window_fraction (encoded again
        or passed on: window_mode), and anchor_query: what else a block's prefix holds;
        block_temperature: phase 2's temperature of the other blocks; recompute_fraction:
        the share of the tokens outside block 0 whose K/V is recomputed after phase 1
        (above)."""
        super().__init__(place, comm)
        check_star_settings(block_size, blocks, anchor_tokens, anchor_fraction, anchor_mode, layout, window_tokens,
                            window_fraction, block_temperature, recompute_fraction, window_mode)
        self.block_size, self.blocks = block_size, blocks
        self.anchor_tokens, self.anchor_fraction, self.anchor_mode = anchor_tokens, anchor_fraction, anchor_mode
        self.balanced, self.token_weight = layout == "balanced", token_weight
        self.window_tokens, self.window_fraction, self.reads_query = window_tokens, window_fraction, anchor_query
        self.passes_window = window_mode == "pass"
        self.key_scale = 1.0 / block_temperature
        self.recompute_fraction = recompute_fraction

    def describe(self) -> str:
        block = (f"{self.block_size} tokens" if self.block_size else
                 f"context/{self.blocks}" if self.blocks else "context/ranks")
        anchor = (f"{self.anchor_tokens} tokens" if self.anchor_tokens else
                  f"{fraction_text(self.anchor_fraction)} of the block" if self.anchor_fraction else "the block")
        layout = ", block 0 balanced" if self.balanced else ""
        window = (f", then the {self.window_tokens} tokens before the block" if self.window_tokens else
                  f", then {fraction_text(self.window_fraction)} of a block before it" if self.window_fraction else "")
        window += " (its K/V passed on)" if window and self.passes_window else ""
        question = "the question, then " if self.reads_query else ""
        temperature = f", the other blocks at temperature {1 / self.key_scale:g} in phase 2" \
            if self.key_scale != 1.0 else ""
        recompute = f", {self.recompute_fraction:g} of the other blocks' K/V recomputed" \
            if self.recompute_fraction else ""
        return (f"star (block {block}{layout}, {question}anchor {anchor}{window}, anchor K/V by {self.anchor_mode}"
                f"{temperature}{recompute})")

    def _anchor_for(self, block: int) -> int:
        """The anchor's tokens when the blocks (other than a balanced block 0) have `block` tokens."""
        return self.anchor_tokens or (max(1, round(self.anchor_fraction * block)) if self.anchor_fraction else block)

    def _window_for(self, block: int) -> int:
        """The window's tokens when the blocks (other than a balanced block 0) have `block` tokens."""
        return round(self.window_fraction * block) if self.window_fraction else self.window_tokens

    def _anchored_block_work(self, size: int, anchor: int) -> float:
        """Phase-1 work of a block other than block 0 of `size` tokens after an anchor of
        `anchor`: its window's tokens run through the layers with it, or, passed on, only
        its attention over them."""
        tokens, keys = anchored_block_shape(size, anchor, self._window_for(size), self.passes_window)
        return block_work(tokens, keys, self.token_weight)

    def _block_sizes(self, context_len: int) -> tuple[list[int], int]:
        """The tokens of each block, and the size the anchor is measured in: the blocks'
        (uniform) or the blocks' other than block 0 (balanced)."""
        count, w = self.blocks or self.place.world, self.token_weight
        if self.balanced and self.block_size is not None:
            size = self.block_size
            first = min(context_len, first_block_tokens(self._anchored_block_work(size, self._anchor_for(size)), w))
            return [first] + [min(size, context_len - start) for start in range(first, context_len, size)], size
        if not self.balanced or context_len < 2 * count:
            size = block_tokens(context_len, self.block_size, count)
            return [min(size, context_len - start) for start in range(0, context_len, size)], size
        # The largest size of the other blocks that leaves block 0 at least as much work.
        low, high = 1, context_len // count
        while low < high:
            size = (low + high + 1) // 2
            first = context_len - (count - 1) * size
            if block_work(first, 0, w) >= self._anchored_block_work(size, min(self._anchor_for(size), first)):
                low = size
            else:
                high = size - 1
        return [context_len - (count - 1) * low] + [low] * (count - 1), low

    def layout(self, context_len: int) -> StarLayout:
        """The anchor is clipped to block 0."""
        world = self.place.world
        sizes, nominal = self._block_sizes(context_len)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        blocks = tuple((start, start + size) for start, size in zip(starts, sizes))
        anchor = min(self._anchor_for(nominal), sizes[0]) if sizes else 0
        window = self._window_for(nominal)
        owners = tuple(r for r in range(world) for _ in blocks_of_rank(r, len(blocks), world))
        kept, encoded, received = [0] * world, [0] * world, [0] * world
        layout = StarLayout(context_len, kept=(), encoded=(), received=(), blocks=blocks, owners=owners,
                            anchor_size=anchor, window_tokens=window, window_passed=self.passes_window)
        for b, ((start, end), owner) in enumerate(zip(blocks, owners)):
            kept[owner] += end - start
            if b > 0:  # the window it is encoded after or receives (the query's few tokens are not counted)
                first, _ = layout.window(b)
                if self.passes_window:
                    received[owner] += start - first
                else:
                    encoded[owner] += start - first
        for rank in range(world):
            mine = [b for b, owner in enumerate(owners) if owner == rank]
            needs_anchor = bool(mine) and 0 not in mine
            recomputes = needs_anchor and self._recomputes_anchor(len(blocks))
            encoded[rank] += kept[rank] + (anchor if recomputes else 0)
            received[rank] += anchor if needs_anchor and not recomputes else 0
        return dataclasses.replace(layout, kept=tuple(kept), encoded=tuple(encoded), received=tuple(received))

    def _recomputes_anchor(self, num_blocks: int) -> bool:
        """Whether ranks without block 0 compute the anchor's K/V themselves."""
        return self.anchor_mode == "recompute" or num_blocks == 1

    def context_capacity(self, rank: int, max_context: int) -> int:
        world = self.place.world
        if self.balanced and self.block_size is None:
            # With a fixed number of blocks every size grows with the context, but for block
            # 0 taking the others' rounding (fewer than 2 tokens per block).
            return self.layout(max_context).kept[rank] + 2 * (self.blocks or world)
        if self.block_size is None:  # n blocks (at most) of ceil(context / n) tokens at most
            n = self.blocks or world
            size, most_blocks, extra = -(-max_context // n), n, 0
        else:  # counting every block as full bounds the query rank's short last block too
            size, most_blocks = self.block_size, -(-max_context // self.block_size)
            extra = self._block_sizes(max_context)[0][0] - size if self.balanced and max_context > size else 0
        return max(size * len(mine) + (extra if 0 in mine else 0)
                   for n in range(1, most_blocks + 1) for mine in [blocks_of_rank(rank, n, world)])

    def encode_context(self, model: Transformer, context_ids: Tensor, layout: StarLayout,
                       arena: _C.KVArena, query_ids: Tensor | None = None) -> None:
        """query_ids: the question, where the blocks are encoded knowing it (anchor_query)."""
        if not layout.blocks:
            return
        device, anchor = context_ids.device, layout.anchor_size
        mine = layout.blocks_of(self.place.rank)
        broadcast = not self._recomputes_anchor(len(layout.blocks))

        # Sequences this rank runs through the layers: its blocks, each after its prefix
        # (the query, the window), and the anchor where it recomputes it.
        seqs = [self._block_sequence(b, context_ids, layout, query_ids) for b in mine]
        needs_anchor = any(seq.anchored for seq in seqs)
        if needs_anchor and 0 not in mine and not broadcast:
            seqs.insert(0, _Sequence(context_ids[:anchor], torch.arange(anchor, device=device),
                                     stored=False, anchored=False))
        # What this rank's K/V messages (the anchor's, a window's) are made of.
        kv_like = torch.empty((2, model.kv_heads, 0, model.config.head_dim), dtype=model.embed.weight.dtype,
                              device=device)

        hidden = [model.embed_tokens(seq.ids) for seq in seqs]
        ropes = [model.rope(seq.positions) for seq in seqs]
        for layer_idx, layer in enumerate(model.layers):
            # Every sequence's q, k, v first: the owner of block 0 then sends the anchor's
            # K/V of this layer before its attention and MLP, and the others have theirs
            # ready when it arrives, so that no rank waits longer than it must.
            anchor_kv, qkv = None, []
            for i, seq in enumerate(seqs):
                q, k, v = layer.qkv(hidden[i], *ropes[i])
                if seq.stored:
                    kept = k[:, seq.prefix:]
                    arena.append(layer_idx, kept * self.key_scale if seq.anchored and self.key_scale != 1.0 else kept,
                                 v[:, seq.prefix:])
                if not seq.anchored:
                    anchor_kv = torch.stack((k[:, :anchor], v[:, :anchor]))
                qkv.append((q, k, v))
            if broadcast:
                if anchor_kv is None:
                    anchor_kv = kv_like.new_empty((2, model.kv_heads, anchor, model.config.head_dim))
                anchor_kv = self.comm.broadcast(anchor_kv.contiguous(), root=layout.owners[0])
            windows = self._passed_windows(layout, seqs, qkv, kv_like) if layout.window_passed else {}
            for i, (seq, (q, k, v)) in enumerate(zip(seqs, qkv)):
                hidden[i] = layer.finish(hidden[i], self._attention(seq, q, k, v, anchor_kv, windows.get(seq.block)))
            del qkv
        del hidden
        if self.recompute_fraction:
            first = layout.blocks[mine[0]][0] if mine else 0
            recompute_context(model, context_ids, arena, first, self._outside_block_0(layout),
                              self.recompute_fraction, self.comm, self.place)

    def _outside_block_0(self, layout: StarLayout) -> list[list[tuple[int, int]]]:
        """By rank, the context positions [start, end) of its blocks other than block 0."""
        return [[layout.blocks[b] for b in layout.blocks_of(rank) if b > 0] for rank in range(self.place.world)]

    def _passed_windows(self, layout: StarLayout, seqs: list[_Sequence], qkv: list[tuple[Tensor, Tensor, Tensor]],
                        message_like: Tensor) -> dict[int, Tensor]:
        """This layer's K/V [2, kv_heads, tokens, head_dim] of the window of each of this
        rank's blocks: the K/V its previous block's encoding computed for those tokens (as
        computed, before any temperature). A rank's first block gets its window from the
        rank holding the block before it, in exchanges around the ranks: one where every
        rank holds a block, else as many as the most ranks without a block in a row plus
        one, those ranks handing the message on. Each message is as long as the longest
        window, so that every rank's is the same size (message_like's dtype, device, heads
        and head_dim); the last rank's to rank 0 is unused."""
        kept = {seq.block: (k[:, seq.prefix:], v[:, seq.prefix:]) for seq, (_, k, v) in zip(seqs, qkv) if seq.stored}

        def window_of(block: int) -> Tensor:  # from the previous block, which this rank holds
            first, end = layout.window(block)
            start = layout.blocks[block - 1][0]
            k, v = kept[block - 1]
            return torch.stack((k[:, first - start:end - start], v[:, first - start:end - start]))

        mine = sorted(kept)
        windows = {b: window_of(b) for b in mine if b > 0 and b - 1 in kept}
        rank, world = self.place.rank, self.place.world
        longest = max((end - first for first, end in map(layout.window, range(1, len(layout.blocks)))), default=0)
        if world == 1 or longest == 0:
            return windows
        holders = sorted(set(layout.owners))
        hops = max((later - earlier for earlier, later in zip(holders, holders[1:])), default=1)
        heads, _, head_dim = message_like.shape[-3:]
        message = torch.zeros((2, heads, longest, head_dim), dtype=message_like.dtype, device=message_like.device)
        following = mine[-1] + 1 if mine else len(layout.blocks)
        if following < len(layout.blocks):  # what the next holder's first block needs of this rank's last
            window = window_of(following)
            message[:, :, :window.shape[2]] = window
        first = mine[0] if mine else 0
        arrives_after = rank - layout.owners[first - 1] if first > 0 else 0  # hops from the previous block's rank
        for hop in range(1, hops + 1):
            message = self.comm.send_recv(message, (rank + 1) % world, torch.empty_like(message), (rank - 1) % world)
            if hop == arrives_after:
                start, end = layout.window(first)
                windows[first] = message[:, :, :end - start]
        return windows

    @staticmethod
    def _attention(seq: _Sequence, q: Tensor, k: Tensor, v: Tensor, anchor_kv: Tensor | None,
                   window_kv: Tensor | None = None) -> Tensor:
        """A sequence's causal attention: an anchored block's over the anchor's K/V first
        (and then its window's, where passed on), after the question where the sequence
        starts with one (which sees only itself)."""
        if not seq.anchored:
            return local_attention(q, k, v, causal=True)
        n = seq.question
        prefix = anchor_kv if window_kv is None else torch.cat((anchor_kv, window_kv), dim=2)
        keys = torch.cat((k[:, :n], prefix[0], k[:, n:]), dim=1)
        values = torch.cat((v[:, :n], prefix[1], v[:, n:]), dim=1)
        rest = local_attention(q[:, n:], keys, values, causal=True)  # the last of the keys: bottom-right
        if n == 0:
            return rest
        return torch.cat((local_attention(q[:, :n], k[:, :n], v[:, :n], causal=True), rest), dim=1)

    @staticmethod
    def _block_sequence(block: int, context_ids: Tensor, layout: StarLayout, query_ids: Tensor | None) -> _Sequence:
        """Block `block`'s tokens at their positions, after its prefix: the question, which
        comes before the anchor (at the positions just before 0), then the window. Were the
        question just before the block, the block's first tokens would be encoded as what
        follows the question, and a model may answer it by copying them."""
        device = context_ids.device
        start, end = layout.blocks[block]
        if block == 0:
            return _Sequence(context_ids[start:end], torch.arange(start, end, device=device), stored=True,
                             anchored=False, block=0)
        first = start if layout.window_passed else layout.window(block)[0]
        query = query_ids.to(device) if query_ids is not None else context_ids[:0]
        ids = torch.cat((query, context_ids[first:end]))
        positions = torch.cat((torch.arange(-len(query), 0, device=device), torch.arange(first, end, device=device)))
        return _Sequence(ids, positions, stored=True, anchored=True, prefix=len(query) + start - first,
                         question=len(query), block=block)


@dataclass(frozen=True)
class _Sequence:
    ids: Tensor
    positions: Tensor
    stored: bool  # its K/V goes to the arena (a block) or not (a recomputed anchor)
    anchored: bool  # attends over [anchor ; itself]
    prefix: int = 0  # its first tokens, which precede the block and are not kept
    question: int = 0  # of those, the first: the question, which precedes the anchor
    block: int = -1  # the block it encodes (-1: a recomputed anchor)
