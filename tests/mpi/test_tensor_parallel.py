"""Hosts of --tp ranks that split the model, with the strategies across hosts, against
single-process references: every way the ranks of the job form hosts of 2 or 4."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_model
from star_engine.comm import MpiCommunicator, MpiHostGroup
from star_engine.engine import Engine
from star_engine.hosts import Hosts
from star_engine.settings import KVCacheSettings
from tests.mpi.test_strategies import NEW_TOKENS, assert_same_tokens_on_every_rank, request
from tests.reference import causal_attention, star_reference_logits, uniform_blocks

TP = [2, 4]  # the tiny checkpoint has 4 heads and 2 KV heads: with 4, two ranks share a KV head


@cache
def split(dist, tp: int):
    """This rank's hosts, its shard of the tiny checkpoint and the communicator of its peers."""
    hosts = Hosts(dist, tp)
    return hosts, MpiHostGroup(hosts.members), MpiCommunicator(hosts.peers)


@pytest.fixture(params=TP, ids=lambda tp: f"tp{tp}")
def tp(request, dist):
    if dist.world % request.param:
        pytest.skip(f"{dist.world} ranks do not form hosts of {request.param}")
    return request.param


def sharded(dist, checkpoint, tp: int):
    hosts, group, peers = split(dist, tp)
    model = load_model(str(checkpoint), torch.float32, torch.device("cpu"), shard=hosts.shard(_config(checkpoint)),
                       host=group)
    return hosts, model, peers


@cache
def _config(checkpoint):
    from star_engine.checkpoint import load_config
    return load_config(str(checkpoint))


def test_a_split_model_gives_the_whole_models_logits_on_every_rank_of_a_host(dist, tiny_checkpoint, tp):
    hosts, model, _ = sharded(dist, tiny_checkpoint, tp)
    whole = load_model(str(tiny_checkpoint), torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(37)

    got = model.logits(model(ids, positions, causal_attention))
    want = whole.logits(whole(ids, positions, causal_attention))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(got, other) for other in hosts.members.allgather(got))  # the host agrees exactly
    assert model.heads == 4 // tp and model.kv_heads == max(1, 2 // tp)


@pytest.mark.parametrize("attn", ["dense", "ring"])
def test_ring_and_dense_across_hosts_give_dense_attentions_tokens(dist, tiny_checkpoint, tp, attn):
    hosts, model, peers = sharded(dist, tiny_checkpoint, tp)
    context, query = request(90, seed=3)
    strategy = (DenseAttention if attn == "dense" else RingAttention)(hosts.place, peers)
    engine = Engine(model, strategy, peers, dist, KVCacheSettings(256))
    gen = engine.generate(context, query, NEW_TOKENS, keep_logits=True)
    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if hosts.place.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, [(0, 90)], 0)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        assert gen.tokens == [int(step[-1].argmax()) for step in want]


@pytest.mark.parametrize("mode,levers", [
    ("broadcast", {}),
    ("recompute", {}),
    ("broadcast", dict(window_tokens=8, anchor_query=True, block_temperature=1.3)),  # every lever
    ("recompute", dict(window_tokens=8, window_mode="pass", anchor_query=True)),  # the window passed on
])
def test_star_across_hosts_equals_the_single_process_reference(dist, tiny_checkpoint, tp, mode, levers):
    hosts, model, peers = sharded(dist, tiny_checkpoint, tp)
    context, query = request(97, seed=4)
    strategy = StarAttention(hosts.place, peers, block_size=16, anchor_tokens=16, anchor_mode=mode, **levers)
    engine = Engine(model, strategy, peers, dist, KVCacheSettings(256))
    gen = engine.generate(context, query, NEW_TOKENS, keep_logits=True)
    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if hosts.place.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, uniform_blocks(97, 16), 16,
                                     window=levers.get("window_tokens", 0) if "window_mode" not in levers else 0,
                                     query_first=levers.get("anchor_query", False),
                                     temperature=levers.get("block_temperature", 1.0),
                                     passed_window=levers["window_tokens"] if "window_mode" in levers else 0)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_star_that_recomputes_every_token_across_hosts_gives_dense_attentions_logits(dist, tiny_checkpoint, tp):
    """The host's ranks choose the tokens together (from the deviation over all heads)."""
    hosts, model, peers = sharded(dist, tiny_checkpoint, tp)
    context, query = request(90, seed=5)
    strategy = StarAttention(hosts.place, peers, block_size=16, anchor_tokens=4, recompute_fraction=1.0)
    gen = Engine(model, strategy, peers, dist, KVCacheSettings(256)).generate(context, query, NEW_TOKENS,
                                                                             keep_logits=True)
    assert_same_tokens_on_every_rank(dist, gen.tokens)
    if hosts.place.is_query_rank:
        want = star_reference_logits(tiny_checkpoint, context, query, gen.tokens, [(0, 90)], 0)
        for got, ref in zip(gen.logits, want):
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_requests_decoded_together_across_hosts_get_the_tokens_each_gets_alone(dist, tiny_checkpoint, tp):
    hosts, model, peers = sharded(dist, tiny_checkpoint, tp)
    requests = [(*request(30 + 11 * i, seed=i), 2 + i % 3) for i in range(4)]
    alone = Engine(model, StarAttention(hosts.place, peers, block_size=16), peers, dist, KVCacheSettings(128))
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]
    together = Engine(model, StarAttention(hosts.place, peers, block_size=16), peers, dist,
                      KVCacheSettings(128, batch=2))
    got = dict(together.generate_many([(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests],
                                      stop_at_eos=False))
    assert [got[i].tokens for i in range(len(requests))] == want


def test_questions_sharing_a_context_across_hosts_get_the_tokens_each_gets_alone(dist, tiny_checkpoint, tp):
    hosts, model, peers = sharded(dist, tiny_checkpoint, tp)
    context, _ = request(70, seed=7)
    requests = [(context, request(70, query_len=3 + i, seed=20 + i)[1], 2 + i) for i in range(4)]
    alone = Engine(model, StarAttention(hosts.place, peers, block_size=16), peers, dist,
                   KVCacheSettings(128, max_tail=16))
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]
    together = Engine(model, StarAttention(hosts.place, peers, block_size=16), peers, dist,
                      KVCacheSettings(128, batch=3, max_tail=16, contexts=1))
    got = dict(together.generate_many([(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests],
                                      stop_at_eos=False))
    assert [got[i].tokens for i in range(len(requests))] == want
    assert [got[i].metrics.context_reused for i in range(len(requests))] == [False, True, True, True]
