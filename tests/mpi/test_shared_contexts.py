"""Requests of a batch that ask about one context share its K/V: one arena holds it, the
others read it there and hold only their own query and tokens. Each request still gets
the tokens it gets alone."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_model
from star_engine.engine import Engine
from star_engine.settings import KVCacheSettings
from star_engine.slots import kv_cache_slots

STRATEGIES = {
    "star": lambda dist, comm: StarAttention(dist, comm, block_size=16),
    "ring": lambda dist, comm: RingAttention(dist, comm),
    "dense": lambda dist, comm: DenseAttention(dist, comm),
}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), torch.float32, torch.device("cpu"))


def ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed))


def questions_about_contexts() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Three contexts, asked 4, 1 and 3 questions of their own lengths and limits, in
    that order: requests of one context join while its first one decodes."""
    contexts = [ids(90, 1), ids(47, 2), ids(120, 3)]
    asked = [0, 0, 0, 0, 1, 2, 2, 2]
    return [(contexts[c], ids(3 + i % 4, 100 + i), 3 + (5 * i) % 7) for i, c in enumerate(asked)]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("contexts", [1, 2, None])
def test_questions_that_share_a_context_read_it_from_one_arena_and_get_the_tokens_each_gets_alone(
        dist, comm, model, name, contexts):
    requests = questions_about_contexts()
    alone = Engine(model, STRATEGIES[name](dist, comm), comm, dist, KVCacheSettings(256, max_tail=32))
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]

    together = Engine(model, STRATEGIES[name](dist, comm), comm, dist,
                      KVCacheSettings(256, batch=4, max_tail=32, contexts=contexts))
    assert [slot.whole for slot in together.slots].count(True) == (contexts or 4)
    jobs = [(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests]
    got = dict(together.generate_many(jobs, stop_at_eos=False))
    assert [got[i].tokens for i in range(len(requests))] == want
    # The first question of each context encodes it; the others, asked while it decodes, read it.
    assert [got[i].metrics.context_reused for i in range(len(requests))] == [False, True, True, True,
                                                                                False, False, True, True]
    assert all(slot.readers == 0 and slot.reads is None for slot in together.slots)


def test_a_tail_slot_holds_only_a_query_and_its_tokens_on_the_query_rank_and_nothing_elsewhere(dist, comm, model):
    engine = Engine(model, StarAttention(dist, comm, block_size=16), comm, dist,
                    KVCacheSettings(256, batch=4, max_tail=32, contexts=1))
    tails = [slot.arena.capacity for slot in engine.slots if not slot.whole]
    assert tails == [32 if dist.is_query_rank else 0] * 3


def test_the_kv_cache_counts_a_shared_context_once():
    whole, tail = [100, 140], [0, 40]  # by rank: the query rank (1) holds the tails
    assert kv_cache_slots(whole, tail, KVCacheSettings(batch=16)) == 16 * 140
    assert kv_cache_slots(whole, tail, KVCacheSettings(batch=16, contexts=2)) == 2 * 140 + 14 * 40
    assert kv_cache_slots(whole, tail, KVCacheSettings(batch=16, contexts=99)) == 16 * 140  # at most the batch


def test_a_decode_step_reads_a_shared_context_once_for_all_the_requests_that_read_it(dist, comm, model,
                                                                                     monkeypatch):
    import star_engine.attention.decode as decode

    reads = []

    def recording(q, k, v, causal):
        reads.append((q.shape[1], k.shape[1]))
        return local_attention_lse(q, k, v, causal)

    local_attention_lse = decode.local_attention_lse
    monkeypatch.setattr(decode, "local_attention_lse", recording)
    engine = Engine(model, StarAttention(dist, comm, block_size=16), comm, dist,
                    KVCacheSettings(256, batch=4, max_tail=32, contexts=1))
    context = ids(90, 5)
    jobs = [(context, ids(4, 50 + i), engine.plan(90, 4, 5)) for i in range(4)]
    got = dict(engine.generate_many(jobs, stop_at_eos=False))
    share = engine.slots[0].encoded[1]  # this rank's part of the context, which the first request holds
    if share:
        # In each layer of the 4 steps after the query: the four requests' queries over it at
        # once, the first request's among them, which holds it.
        assert reads.count((4, share)) == 4 * model.config.num_layers
        # No row reads it alone: each attends on its own only to the keys after it.
        assert all(keys < share for rows, keys in reads if rows == 1)
    assert [got[i].metrics.context_reused for i in range(4)] == [False, True, True, True]
