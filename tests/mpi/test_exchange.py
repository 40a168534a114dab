"""The communicator and phase 2 on N ranks: every rank gets exact global attention."""

from __future__ import annotations

import pytest
import torch

from star_engine import _C
from star_engine.attention.local import local_attention_lse
from star_engine.attention.phase2 import query_attention
from tests.reference import causal_visible, naive_attention

HEADS, KV_HEADS, DIM = 4, 2, 16


def rank_keys(rank: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(KV_HEADS, length, DIM, generator=gen),
            torch.randn(KV_HEADS, length, DIM, generator=gen))


def local_lengths(world: int) -> list[int]:
    """Uneven shares, and a rank with no keys at all when there are several ranks."""
    return [0 if (r == 1 and world > 2) else 7 + 5 * r for r in range(world)]


def test_gather_merge_equals_softmax_over_the_keys_of_all_ranks(dist, comm):
    lengths = local_lengths(dist.world)
    q = torch.randn(HEADS, 3, DIM, generator=torch.Generator().manual_seed(7))
    k, v = rank_keys(dist.rank, lengths[dist.rank])
    o, lse = local_attention_lse(q, k, v, causal=False)

    merged_o, merged_lse = comm.gather_merge(o, lse)

    all_k, all_v = zip(*(rank_keys(r, n) for r, n in enumerate(lengths)))
    want_o, want_lse = naive_attention(q, torch.cat(all_k, 1), torch.cat(all_v, 1))
    torch.testing.assert_close(merged_o.double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_broadcast_gives_every_rank_the_roots_tensor(dist, comm):
    for root in range(dist.world):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            t = torch.full((3, 5), dist.rank, dtype=dtype)
            comm.broadcast(t, root=root)
            assert torch.equal(t, torch.full((3, 5), root, dtype=dtype))


def test_send_recv_passes_a_tensor_one_step_around_the_ring(dist, comm):
    send = torch.full((1000, 64), float(dist.rank))  # large enough to need a rendezvous
    recv = torch.empty_like(send)
    comm.send_recv(send, (dist.rank + 1) % dist.world, recv, (dist.rank - 1) % dist.world)
    assert torch.equal(recv, torch.full_like(send, float((dist.rank - 1) % dist.world)))


@pytest.mark.parametrize("query_len", [1, 6])
def test_phase2_query_tokens_see_every_context_token_of_every_rank(dist, comm, query_len):
    """Exact phase 2: query token i sees all context keys of all ranks, and the query
    tokens up to i. A non-query rank that masked its keys causally (aligning the query's
    tokens with its last keys) would hide its last query_len-1-i keys from token i."""
    lengths = local_lengths(dist.world)
    arena = _C.KVArena(1, KV_HEADS, DIM, 64, torch.float32, torch.device("cpu"))
    arena.append(0, *rank_keys(dist.rank, lengths[dist.rank]))
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(HEADS, query_len, DIM, generator=gen)
    k_new = torch.randn(KV_HEADS, query_len, DIM, generator=gen)
    v_new = torch.randn(KV_HEADS, query_len, DIM, generator=gen)

    attend = query_attention(arena, comm, dist.is_query_rank)
    o = attend(0, q, k_new, v_new)

    all_k, all_v = zip(*(rank_keys(r, n) for r, n in enumerate(lengths)))
    keys = torch.cat([*all_k, k_new], 1)
    values = torch.cat([*all_v, v_new], 1)
    want, _ = naive_attention(q, keys, values, causal_visible(query_len, keys.shape[1]))
    torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
    # Only the query rank keeps the new tokens.
    stored = lengths[dist.rank] + (query_len if dist.is_query_rank else 0)
    assert arena.length(0) == stored
