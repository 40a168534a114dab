"""Selective recompute of star's context K/V: star's `recompute_fraction` r.

Star encodes each block other than block 0 after the anchor alone, so from layer 1 on its
tokens' K/V is not what attention over the whole context would give (layer 0's is: it
depends on a token and its position only). CacheBlend (Yao et al., EuroSys 2025) found, for
chunks encoded apart, that a small share of the tokens carries most of that deviation, and
that recomputing their K/V exactly over the cache as it stands recovers most of the loss.
After phase 1, each rank:

1. Chooses its tokens. It runs layer 0 exactly for its tokens outside block 0 (the layer-0
   K/V of the context before them comes from the token ids: no communication) and compares
   the layer-1 K/V they then get with what phase 1 wrote; in each block, the fraction r of
   its tokens whose K/V moved most (squared distance over heads, summed over a
   tensor-parallel host so that its ranks agree) is recomputed. Their exact layer-0 output is where the recompute starts.
2. Recomputes them layer by layer from layer 1: their hidden states give q, k, v; k, v
   replace phase 1's in the arena; the queries pass once around the ring of ranks with their
   partial attention (o, lse), every rank merging in what its keys before each token's
   position contribute, and come home with attention over the whole context before them
   (the other tokens' K/V as phase 1 left it); the layer's output projection and MLP then
   give their next hidden states.

The recompute's work is r of the tokens' per-token work and their attention over all the
context before them, plus one layer of exact attention for the choice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch.control import Place
from ..model import Transformer
from .local import local_attention, local_attention_lse
from .merge import merge_into

# Keys per piece of a rank's K/V that a query attends either whole (it comes after the
# piece) or masked by position (it lies within): the masked part stays small.
_KEY_PIECE = 4096


def recomputed_tokens(fraction: float, tokens: int) -> int:
    """How many of a block's `tokens` the recompute takes."""
    return math.ceil(fraction * tokens)


def recompute_context(model: Transformer, context_ids: Tensor, arena: _C.KVArena, first: int,
                      blocks: list[list[tuple[int, int]]], fraction: float, comm: Communicator | None,
                      place: Place) -> None:
    """Recomputes the K/V that phase 1 left in `arena` for the chosen tokens (above): in
    each block, its share r of the tokens, so that the choice does not depend on how the
    blocks are dealt. first: the context position of the arena's first token (the rank's
    tokens follow in order); blocks: by rank, the positions [start, end) of its blocks
    other than block 0 (contiguous), the same on every rank."""
    counts = [sum(recomputed_tokens(fraction, end - start) for start, end in mine) for mine in blocks]
    if max(counts) == 0:
        return
    hidden, positions = _chosen_after_layer_0(model, context_ids, arena, first, blocks[place.rank], fraction)
    for layer_idx in range(1, len(model.layers)):
        layer = model.layers[layer_idx]
        q, k, v = layer.qkv(hidden, *model.rope(positions))
        rows = positions - first
        arena.keys(layer_idx).index_copy_(1, rows, k)
        arena.values(layer_idx).index_copy_(1, rows, v)
        o = _ring_pass(q, positions, max(counts), arena, layer_idx, first, comm, place)
        hidden = layer.finish(hidden, o.to(q.dtype))


def _chosen_after_layer_0(model: Transformer, context_ids: Tensor, arena: _C.KVArena, first: int,
                          blocks: list[tuple[int, int]], fraction: float) -> tuple[Tensor, Tensor]:
    """The rank's chosen tokens (positions, ascending) and their exact hidden states after
    layer 0."""
    device = context_ids.device
    if not blocks:
        return model.embed_tokens(context_ids[:0]), torch.arange(0, device=device)
    start, end = blocks[0][0], blocks[-1][1]
    positions = torch.arange(start, end, device=device)
    layer0, layer1 = model.layers[0], model.layers[1]
    x_before = model.embed_tokens(context_ids[:start])
    _, k_before, v_before = layer0.qkv(x_before, *model.rope(torch.arange(start, device=device)))
    del x_before
    x = model.embed_tokens(context_ids[start:end])
    q, k, v = layer0.qkv(x, *model.rope(positions))
    o = local_attention(q, torch.cat((k_before, k), 1), torch.cat((v_before, v), 1), causal=True)
    del k_before, v_before, q, k, v
    x = layer0.finish(x, o)
    _, k1, v1 = layer1.qkv(x, *model.rope(positions))
    rows = slice(start - first, end - first)
    moved = ((k1.float() - arena.keys(1)[:, rows].float()).square().sum((0, 2))
             + (v1.float() - arena.values(1)[:, rows].float()).square().sum((0, 2)))
    if model.host is not None:
        model.host.all_reduce_(moved)  # over the host's heads: its ranks choose alike
    chosen = torch.cat([moved[b - start:e - start].topk(recomputed_tokens(fraction, e - b)).indices.sort().values
                        + (b - start) for b, e in blocks])
    return x[chosen], positions[chosen]


def _ring_pass(q: Tensor, positions: Tensor, padded: int, arena: _C.KVArena, layer: int, first: int,
               comm: Communicator | None, place: Place) -> Tensor:
    """Attention of this rank's queries (at `positions`) over the keys of every rank before
    each query's position: o [H, m, D] float32. The queries travel padded to `padded` rows
    (position -1: no key), each with its partial (o, lse)."""
    heads, m, dim = q.shape
    query = q.new_zeros(heads, padded, dim)
    query[:, :m] = q
    pos = torch.full((padded,), -1, dtype=torch.int64, device=q.device)
    pos[:m] = positions
    o = torch.zeros(heads, padded, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, padded), float("-inf"), dtype=torch.float32, device=q.device)
    keys, values = arena.keys(layer), arena.values(layer)
    for _ in range(place.world):
        _attend_before(query, pos, keys, values, first, o, lse)
        if place.world > 1:  # on to the next rank: after `world` passes, every packet is home
            query, pos, o, lse = _pass_on(query, pos, o, lse, comm, place)
    return o[:, :m]


def _pass_on(query: Tensor, pos: Tensor, o: Tensor, lse: Tensor, comm: Communicator,
             place: Place) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The packet in hand to the next rank, the previous rank's in its place."""
    send_to, receive_from = (place.rank + 1) % place.world, (place.rank - 1) % place.world
    heads, rows, dim = query.shape
    state = torch.cat((o.reshape(-1), lse.reshape(-1), pos.float())).contiguous()
    query = comm.send_recv(query.contiguous(), send_to, torch.empty_like(query), receive_from)
    state = comm.send_recv(state, send_to, torch.empty_like(state), receive_from)
    o = state[:heads * rows * dim].view(heads, rows, dim).clone()
    lse = state[heads * rows * dim:heads * rows * (dim + 1)].view(heads, rows).clone()
    pos = state[heads * rows * (dim + 1):].round().long()
    return query, pos, o, lse


def _attend_before(q: Tensor, pos: Tensor, keys: Tensor, values: Tensor, first: int, o: Tensor,
                   lse: Tensor) -> None:
    """Merges into (o, lse) each query's attention over the keys (at positions first,
    first + 1, ...) up to its own position: piece by piece, a piece wholly before a query
    through the backend's kernel, one it lies within with the keys after it masked."""
    for piece in range(0, keys.shape[1], _KEY_PIECE):
        piece_end = min(keys.shape[1], piece + _KEY_PIECE)
        last = first + piece_end - 1  # the piece's last key position
        whole = (pos >= last).nonzero().flatten()
        within = ((pos >= first + piece) & (pos < last)).nonzero().flatten()
        k, v = keys[:, piece:piece_end], values[:, piece:piece_end]
        if len(whole):
            _merge_rows(o, lse, whole, *local_attention_lse(q[:, whole], k, v, causal=False))
        if len(within):
            _merge_rows(o, lse, within, *_masked_attention(q[:, within], pos[within] - (first + piece), k, v))


def _masked_attention(q: Tensor, sees_up_to: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of q [H, m, D] over keys 0..sees_up_to[i] of k, v (float32 arithmetic)."""
    heads, m, dim = q.shape
    kv_heads, tk, _ = k.shape
    qg = q.float().reshape(kv_heads, heads // kv_heads, m, dim)
    scores = torch.einsum("kgqd,ksd->kgqs", qg, k.float()) * dim ** -0.5
    scores.masked_fill_(torch.arange(tk, device=q.device)[None, :] > sees_up_to[:, None], float("-inf"))
    chunk_lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("kgqs,ksd->kgqd", torch.exp(scores - chunk_lse[..., None]), v.float())
    return o.reshape(heads, m, dim), chunk_lse.reshape(heads, m)


def _merge_rows(o: Tensor, lse: Tensor, rows: Tensor, o2: Tensor, lse2: Tensor) -> None:
    """Merges (o2, lse2) into the given rows of (o, lse); lse2 is finite (each row saw a key)."""
    o[:, rows], lse[:, rows] = merge_into(o[:, rows], lse[:, rows], o2, lse2)
