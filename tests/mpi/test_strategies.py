"""Distributed star and dense against single-process references, on N ranks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from star_engine import _C
from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention, zigzag_chunks
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_model
from star_engine.engine import Engine
from star_engine.launch.control import Place
from star_engine.settings import KVCacheSettings
from tests.reference import make_tiny_checkpoint, star_reference_logits, uniform_blocks

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def deep_model(dist):
    """Four layers: a recompute from layer 1 on changes what layers 2 and 3 see."""
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="star_engine_test_")), num_hidden_layers=4) \
        if dist.rank == 0 else None
    return load_model(str(dist.bcast(path, root=0)), torch.float32, torch.device("cpu"))


def request(context_len: int, query_len: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (context_len + query_len,), generator=gen)
    return ids[:context_len], ids[context_len:]


def run(model, strategy, comm, dist, context, query):
    engine = Engine(model, strategy, comm, dist, KVCacheSettings(512))
    return engine.generate(context, query, NEW_TOKENS, keep_logits=True)


def empty_arena(model, capacity: int = 512) -> _C.KVArena:
    cfg = model.config
    return _C.KVArena(cfg.num_layers, model.kv_heads, cfg.head_dim, capacity, torch.float32, torch.device("cpu"))


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
    gen = run(model, StarAttention(dist, comm, block_size=block, anchor_tokens=anchor, anchor_mode=mode),
              comm, dist, context, query)

    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if dist.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, uniform_blocks(context_len, block),
                                     anchor)
        assert len(gen.logits) == len(want) == NEW_TOKENS
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        assert gen.tokens == [int(step[-1].argmax()) for step in want]


@pytest.mark.parametrize("settings", [
    dict(),                                                    # one block per rank
    dict(blocks=6, anchor_fraction=0.5),                       # several blocks per rank
    dict(blocks=5, anchor_mode="recompute", token_weight=3.0),  # per-token work counted too
    dict(block_size=12, anchor_tokens=5),                      # the others of 12 tokens
])
def test_distributed_balanced_star_equals_the_single_process_reference_of_its_blocks(
        dist, comm, model, tiny_checkpoint, settings):
    star = StarAttention(dist, comm, layout="balanced", **settings)
    context, query = request(131, seed=2)
    layout = star.layout(len(context))
    gen = run(model, star, comm, dist, context, query)

    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if dist.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, list(layout.blocks),
                                     layout.anchor_size)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("window,window_mode,query_first,temperature,mode,block", [
    (10, "encode", False, 1.0, "broadcast", 12),  # a local window shorter than the gap to the anchor
    (10, "encode", False, 1.0, "recompute", 12),
    (0, "encode", True, 1.0, "broadcast", 12),    # the query alone
    (25, "encode", True, 1.0, "recompute", 12),   # both, the window reaching back to the anchor for block 1
    (0, "encode", False, 1.7, "broadcast", 12),   # phase 2's temperature of the anchored blocks
    (10, "pass", False, 1.0, "broadcast", 12),    # the previous block's last tokens, from the previous rank
    (25, "pass", True, 1.0, "recompute", 12),     # longer than a block: the whole previous block, after the question
    (6, "pass", False, 1.7, "broadcast", 12),     # passed on as computed, before phase 2's temperature
    (20, "pass", True, 1.0, "broadcast", 40),     # 3 blocks: on 4 or 8 ranks, ranks without one hand it on
])
def test_star_with_a_window_the_query_or_a_temperature_equals_the_single_process_reference(
        dist, comm, model, tiny_checkpoint, window, window_mode, query_first, temperature, mode, block):
    context, query = request(97, seed=4)  # 9 blocks of 12: one or more on each of up to 8 ranks
    star = StarAttention(dist, comm, block_size=block, anchor_tokens=4, anchor_mode=mode, window_tokens=window,
                         window_mode=window_mode, anchor_query=query_first, block_temperature=temperature)
    engine = Engine(model, star, comm, dist, KVCacheSettings(512))
    plan = engine.plan(len(context), len(query), NEW_TOKENS)
    assert plan.phase1_query_tokens == (len(query) if query_first else 0)
    gen = engine.generate(context, query, NEW_TOKENS, plan=plan, keep_logits=True)

    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if dist.is_query_rank:
        passed = window_mode == "pass"
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, uniform_blocks(97, block), 4,
                                     window=0 if passed else window, passed_window=window if passed else 0,
                                     query_first=query_first, temperature=temperature)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_star_whose_window_reaches_back_to_the_anchor_equals_dense(dist, comm, model):
    """Every block then sees all that precedes it, as under dense attention."""
    context, query = request(90, seed=6)
    star = run(model, StarAttention(dist, comm, block_size=20, anchor_tokens=3, window_tokens=90),
               comm, dist, context, query)
    dense = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    assert star.tokens == dense.tokens
    for a, b in zip(star.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_context_encoded_knowing_one_question_is_not_reused_for_another(dist, comm, model):
    context, first = request(90, seed=8)
    _, second = request(90, query_len=7, seed=9)
    engine = Engine(model, StarAttention(dist, comm, block_size=16, anchor_query=True), comm, dist,
                    KVCacheSettings(512))
    engine.generate(context, first, NEW_TOKENS, reuse_context=True)
    assert not engine.generate(context, second, NEW_TOKENS, reuse_context=True).metrics.context_reused
    assert engine.generate(context, second, NEW_TOKENS, reuse_context=True).metrics.context_reused


def test_a_context_that_several_questions_share_is_encoded_without_the_query(dist, comm, model):
    context, query = request(90, seed=8)
    aware = Engine(model, StarAttention(dist, comm, block_size=16, anchor_query=True), comm, dist,
                   KVCacheSettings(512))
    shared = aware.generate(context, query, NEW_TOKENS, plan=aware.plan(90, len(query), NEW_TOKENS,
                                                                         shared_context=True), keep_logits=True)
    plain = run(model, StarAttention(dist, comm, block_size=16), comm, dist, context, query)
    assert shared.tokens == plain.tokens
    for a, b in zip(shared.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


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
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, [(0, 70)], 70)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_anchor_recompute_and_broadcast_give_the_same_outputs(dist, comm, model):
    context, query = request(120, seed=3)
    outputs = [run(model, StarAttention(dist, comm, block_size=20, anchor_mode=mode), comm, dist, context, query)
               for mode in ("recompute", "broadcast")]
    assert outputs[0].tokens == outputs[1].tokens
    for a, b in zip(outputs[0].logits, outputs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_with_several_blocks_star_differs_from_dense(dist, comm, model):
    """The approximation is real from three blocks on (so the tests above can fail)."""
    context, query = request(90, seed=5)
    star = run(model, StarAttention(dist, comm, block_size=30), comm, dist, context, query)
    dense = run(model, DenseAttention(dist, comm), comm, dist, context, query)
    if dist.is_query_rank:
        assert (star.logits[0] - dense.logits[0]).abs().max() > 1e-3


def test_an_anchor_given_as_a_fraction_of_the_block_is_that_many_tokens(dist, comm, model):
    assert StarAttention(dist, comm, block_size=40, anchor_fraction=0.25).layout(200).anchor_size == 10
    block = -(-96 // dist.world)  # without a block size: the context over the ranks
    assert StarAttention(dist, comm, anchor_fraction=0.5).layout(96).anchor_size == max(1, round(block / 2))
    context, query = request(90, seed=5)
    as_fraction = run(model, StarAttention(dist, comm, block_size=30, anchor_fraction=0.5), comm, dist, context, query)
    as_tokens = run(model, StarAttention(dist, comm, block_size=30, anchor_tokens=15), comm, dist, context, query)
    assert as_fraction.tokens == as_tokens.tokens
    for a, b in zip(as_fraction.logits, as_tokens.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_number_of_blocks_cuts_the_context_into_that_many_equal_blocks(dist, comm, model):
    layout = StarAttention(dist, comm, blocks=3).layout(90)
    assert layout.blocks == ((0, 30), (30, 60), (60, 90)) and layout.anchor_size == 30
    context, query = request(90, seed=5)
    by_count = run(model, StarAttention(dist, comm, blocks=3), comm, dist, context, query)
    by_size = run(model, StarAttention(dist, comm, block_size=30), comm, dist, context, query)
    assert by_count.tokens == by_size.tokens
    for a, b in zip(by_count.logits, by_size.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("settings", [dict(block_size=16), dict(blocks=5), dict(blocks=2, anchor_mode="recompute"),
                                      dict(block_size=7, anchor_tokens=3, anchor_mode="recompute"), {}])
def test_the_request_plan_is_what_the_ranks_store_and_the_arenas_hold(dist, comm, model, settings):
    star = StarAttention(dist, comm, **settings)
    engine = Engine(model, star, comm, dist, KVCacheSettings(512))
    context, query = request(97)
    plan = engine.plan(97, len(query), 3)
    assert sum(plan.layout.kept) == 97 and plan.kv_slots[dist.query_rank] == plan.layout.kept[dist.query_rank] + len(query) + 3
    gen = engine.generate(context, query, 3, plan=plan, stop_at_eos=False)
    assert engine.arena.length(0) == plan.kv_slots[dist.rank] - (1 if dist.is_query_rank else 0)  # the last token is not fed
    assert len(gen.tokens) == 3
    for rank in range(dist.world):  # the closed-form bound of the sizing holds every shorter context
        assert max(star.layout(n).kept[rank] for n in range(0, 498)) <= star.context_capacity(rank, 497)
    # A recomputed anchor is encoded, not kept, by every rank with blocks but not block 0.
    for rank, (kept, encoded) in enumerate(zip(plan.layout.kept, plan.layout.encoded)):
        mine = plan.layout.blocks_of(rank)
        recomputes = star.anchor_mode == "recompute" and mine and 0 not in mine
        assert encoded == kept + (plan.layout.anchor_size if recomputes else 0)


def test_a_request_that_does_not_fit_is_refused_by_its_plan_before_any_compute(dist, comm, model):
    from star_engine.request_plan import RequestTooLarge

    engine = Engine(model, StarAttention(dist, comm), comm, dist, KVCacheSettings(100, max_tail=20))
    with pytest.raises(RequestTooLarge, match="request needs 101 tokens"):
        engine.plan(90, 5, 6)
    with pytest.raises(RequestTooLarge, match="at most 20 after the context"):
        engine.plan(10, 5, 16)
    with pytest.raises(ValueError, match="another request's"):
        engine.generate(*request(50), 4, plan=engine.plan(50, 5, 3))


@pytest.mark.parametrize("make", [
    lambda dist, comm: StarAttention(dist, comm, block_size=16),
    lambda dist, comm: StarAttention(dist, comm, layout="balanced", blocks=5, anchor_mode="recompute"),
    lambda dist, comm: RingAttention(dist, comm),
    lambda dist, comm: DenseAttention(dist, comm),
], ids=["star", "star-balanced", "ring", "dense"])
def test_a_context_encoded_once_answers_each_question_as_if_it_came_alone(dist, comm, model, make):
    context, first = request(90, seed=8)
    _, second = request(90, query_len=7, seed=9)
    shared = Engine(model, make(dist, comm), comm, dist, KVCacheSettings(512))
    shared.generate(context, first, NEW_TOKENS, reuse_context=True)
    again = shared.generate(context, second, NEW_TOKENS, keep_logits=True, reuse_context=True)
    alone = Engine(model, make(dist, comm), comm, dist, KVCacheSettings(512)).generate(
        context, second, NEW_TOKENS, keep_logits=True)
    assert again.metrics.context_reused and again.metrics.phase1_s == 0.0
    assert not alone.metrics.context_reused
    assert again.tokens == alone.tokens
    for a, b in zip(again.logits, alone.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    other, _ = request(90, seed=10)  # another context is encoded anew
    assert not shared.generate(other, second, 2, reuse_context=True).metrics.context_reused


STRATEGIES = {
    "star": lambda dist, comm: StarAttention(dist, comm, block_size=16),
    "star-balanced": lambda dist, comm: StarAttention(dist, comm, layout="balanced", blocks=5, token_weight=40.0),
    "ring": lambda dist, comm: RingAttention(dist, comm),
    "dense": lambda dist, comm: DenseAttention(dist, comm),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_requests_decoded_together_get_the_tokens_each_gets_alone(dist, comm, model, name):
    make = STRATEGIES[name]
    # Contexts of several lengths (two requests share one), queries and limits of their own:
    # requests join and leave the batch at different steps.
    shapes = [(90, 5, 6, 1), (40, 3, 9, 2), (90, 7, 4, 1), (120, 4, 1, 3), (17, 6, 7, 4), (63, 2, 5, 5)]
    requests = []
    for context_len, query_len, new_tokens, seed in shapes:
        context, _ = request(context_len, seed=seed)
        _, query = request(context_len, query_len=query_len, seed=seed + 10)
        requests.append((context, query, new_tokens))
    alone = Engine(model, make(dist, comm), comm, dist, KVCacheSettings(256))
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]

    together = Engine(model, make(dist, comm), comm, dist, KVCacheSettings(256, batch=3))
    jobs = [(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests]
    finished = list(together.generate_many(jobs, stop_at_eos=False))
    got = dict(finished)
    assert sorted(got) == list(range(len(requests)))
    assert [got[i].tokens for i in range(len(requests))] == want
    assert_same_tokens_on_every_rank(dist, [index for index, _ in finished])
    # 2 (4 tokens) leaves first; 3 takes its slot and, with one token, is done at its query.
    assert [index for index, _ in finished][:2] == [2, 3]
    assert got[2].metrics.context_reused and not got[0].metrics.context_reused  # request 0's context


def test_decode_steps_are_made_per_number_of_rows_whatever_requests_they_hold(dist, comm, model):
    requests = [(*request(30 + 7 * i, seed=i), 2 + i % 4) for i in range(7)]
    alone = Engine(model, StarAttention(dist, comm), comm, dist, KVCacheSettings(128))
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]
    together = Engine(model, StarAttention(dist, comm), comm, dist, KVCacheSettings(128, batch=3))
    got = dict(together.generate_many([(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests],
                                      stop_at_eos=False))
    assert [got[i].tokens for i in range(len(requests))] == want
    assert set(together.decoders) <= {1, 2, 3}  # one row per request off the kernel's path


def test_on_the_kernels_path_decode_steps_have_power_of_two_rows_up_to_the_batch():
    from star_engine.decoder import decode_rows

    assert [decode_rows(n, 8, padded=True) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [decode_rows(n, 6, padded=True) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [decode_rows(n, 6, padded=False) for n in range(1, 7)] == [1, 2, 3, 4, 5, 6]


def test_a_batch_that_does_not_fit_in_memory_is_refused_naming_the_batch(dist, comm, model, monkeypatch):
    import star_engine.budget as budget_module
    from star_engine.launch.control import JobError

    monkeypatch.setattr(budget_module, "available_memory", lambda device: 1 << 20)
    with pytest.raises(JobError, match="for requests of 4096 tokens, 8 at once needs .* or --batch"):
        Engine(model, StarAttention(dist, comm), comm, dist, KVCacheSettings(4096, batch=8))


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
        want = star_reference_logits(tiny_checkpoint, context, query, ring.tokens, [(0, context_len)], context_len)
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


@pytest.mark.parametrize("block,mode,query_first", [
    (16, "broadcast", False),  # several blocks per rank
    (40, "recompute", False),
    (25, "broadcast", True),   # the question in phase 1 too: the recompute replaces all it changed
])
def test_star_that_recomputes_every_token_outside_block_0_equals_dense(dist, comm, deep_model, block, mode, query_first):
    """Layer by layer, every token's K/V is then what full attention gives."""
    context, query = request(97, seed=10)
    star = StarAttention(dist, comm, block_size=block, anchor_tokens=4, anchor_mode=mode, anchor_query=query_first,
                         recompute_fraction=1.0)
    recomputed = run(deep_model, star, comm, dist, context, query)
    dense = run(deep_model, DenseAttention(dist, comm), comm, dist, context, query)
    assert recomputed.tokens == dense.tokens
    for a, b in zip(recomputed.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("context_len,block,fraction", [(97, 16, 0.25), (150, 40, 0.1), (30, 7, 0.5)])
def test_selective_recompute_writes_the_same_k_v_on_any_number_of_ranks(dist, comm, deep_model, context_len, block,
                                                                       fraction):
    """Each block's share is chosen within the block: every rank's K/V equals the same
    positions' K/V of the whole context recomputed in one process."""
    context, _ = request(context_len, seed=11)
    settings = dict(block_size=block, anchor_tokens=5, anchor_mode="recompute", recompute_fraction=fraction)
    star = StarAttention(dist, comm, **settings)
    layout = star.layout(context_len)
    arena = empty_arena(deep_model)
    star.encode_context(deep_model, context, layout, arena)
    alone = StarAttention(Place(0, 1), None, **settings)
    whole = empty_arena(deep_model)
    alone.encode_context(deep_model, context, alone.layout(context_len), whole)

    mine = layout.blocks_of(dist.rank)
    if mine:
        first, end = layout.blocks[mine[0]][0], layout.blocks[mine[-1]][1]
        for layer in range(deep_model.config.num_layers):
            torch.testing.assert_close(arena.keys(layer), whole.keys(layer)[:, first:end], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(arena.values(layer), whole.values(layer)[:, first:end], atol=1e-5, rtol=1e-5)
    plain = StarAttention(Place(0, 1), None, block_size=block, anchor_tokens=5, anchor_mode="recompute")
    star_only = empty_arena(deep_model)
    plain.encode_context(deep_model, context, plain.layout(context_len), star_only)
    last = deep_model.config.num_layers - 1
    changed = (whole.keys(last) != star_only.keys(last)).any(0).any(-1)
    assert changed[:layout.blocks[1][0]].sum() == 0  # block 0 is exact already
    assert 0 < changed.sum() <= sum(-(-fraction * (e - s) // 1) for s, e in layout.blocks[1:])
