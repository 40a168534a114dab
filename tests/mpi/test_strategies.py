"""Distributed star and dense against single-process references, on N ranks."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention import DenseAttention, RingAttention, StarAttention
from star_engine.attention.ring import zigzag_chunks
from star_engine.checkpoint import load_model
from star_engine.schedule import Engine
from tests.reference import star_reference_logits

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), torch.float32, torch.device("cpu"))


def request(context_len: int, query_len: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (context_len + query_len,), generator=gen)
    return ids[:context_len], ids[context_len:]


def run(model, strategy, comm, dist, context, query):
    engine = Engine(model, strategy, comm, dist, max_tokens=512)
    return engine.generate(context, query, NEW_TOKENS, keep_logits=True)


def assert_same_tokens_on_every_rank(dist, tokens):
    assert all(t == tokens for t in dist.allgather(tokens))


@pytest.mark.parametrize("context_len,block,anchor,mode", [
    (97, 16, 16, "broadcast"),   # several blocks per rank, short last block
    (97, 16, 16, "recompute"),
    (97, 16, 5, "broadcast"),    # anchor shorter than a block
    (150, 40, 12, "recompute"),
    (61, 25, 25, "broadcast"),   # fewer blocks than ranks on 4 ranks
    (30, 7, 3, "recompute"),
    (9, 16, 16, "broadcast"),    # context shorter than one block
])
def test_distributed_star_equals_single_process_block_sparse_reference(
        dist, comm, model, tiny_checkpoint, context_len, block, anchor, mode):
    context, query = request(context_len)
    gen = run(model, StarAttention(dist, comm, block, anchor, mode), comm, dist, context, query)

    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if dist.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, block, anchor)
        assert len(gen.logits) == len(want) == NEW_TOKENS
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        assert gen.tokens == [int(step[-1].argmax()) for step in want]


def test_star_with_one_block_equals_dense(dist, comm, model):
    context, query = request(80)
    star = run(model, StarAttention(dist, comm, block_size=80), comm, dist, context, query)
    dense = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    assert star.tokens == dense.tokens
    for a, b in zip(star.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dense_on_any_number_of_ranks_equals_causal_attention(dist, comm, model, tiny_checkpoint):
    context, query = request(70)
    gen = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if dist.is_query_rank:  # dense is star with one block: the reference's one-block case
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, 70, 70)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_anchor_recompute_and_broadcast_give_the_same_outputs(dist, comm, model):
    context, query = request(120, seed=3)
    outputs = [run(model, StarAttention(dist, comm, 20, 20, mode), comm, dist, context, query)
               for mode in ("recompute", "broadcast")]
    assert outputs[0].tokens == outputs[1].tokens
    for a, b in zip(outputs[0].logits, outputs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_with_several_blocks_star_differs_from_dense(dist, comm, model):
    """The approximation is real from three blocks on (so the tests above can fail)."""
    context, query = request(90, seed=5)
    star = run(model, StarAttention(dist, comm, 30, 30), comm, dist, context, query)
    dense = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    if dist.is_query_rank:
        assert (star.logits[0] - dense.logits[0]).abs().max() > 1e-3


def test_an_anchor_given_as_a_fraction_of_the_block_is_that_many_tokens(dist, comm, model):
    assert StarAttention(dist, comm, 40, 0.25).layout(200).anchor_size == 10
    block = -(-96 // dist.world)  # without a block size: the context over the ranks
    assert StarAttention(dist, comm, None, 0.5).layout(96).anchor_size == max(1, round(block / 2))
    context, query = request(90, seed=5)
    as_fraction = run(model, StarAttention(dist, comm, 30, 0.5), comm, dist, context, query)
    as_tokens = run(model, StarAttention(dist, comm, 30, 15), comm, dist, context, query)
    assert as_fraction.tokens == as_tokens.tokens
    for a, b in zip(as_fraction.logits, as_tokens.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_kv_shares_match_the_layout(dist, comm, model):
    star = StarAttention(dist, comm, block_size=16)
    engine = Engine(model, star, comm, dist, max_tokens=512)
    context, query = request(97)
    engine.generate(context, query, 1)
    assert engine.arena.length(0) == star.context_split(97)[dist.rank] + (len(query) if dist.is_query_rank else 0)
    assert sum(star.context_split(97)) == 97


@pytest.mark.parametrize("context_len", [97, 64, 5])  # 5: fewer tokens than chunks on 3-4 ranks
def test_ring_equals_dense_and_causal_attention(dist, comm, model, tiny_checkpoint, context_len):
    context, query = request(context_len, seed=7)
    ring = run(model, RingAttention(dist, comm), comm, dist, context, query)
    dense = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    assert_same_tokens_on_every_rank(dist, ring.tokens)
    assert ring.tokens == dense.tokens
    for a, b in zip(ring.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if dist.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, ring.tokens, context_len, context_len)
        for got, ref in zip(ring.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_ring_deals_each_rank_an_early_and_a_late_chunk(dist):
    spans = zigzag_chunks(1000, dist.world)
    chunks = sorted(c for rank_spans in spans for c in rank_spans)
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # they tile the context
    for rank, (early, late) in enumerate(spans):
        assert early == chunks[rank] and late == chunks[2 * dist.world - 1 - rank]
    shares = [sum(e - s for s, e in rank_spans) for rank_spans in spans]
    assert max(shares) - min(shares) <= 2
