"""The engine on one GPU (bfloat16) against the same engine on the CPU (float32), and the
CUDA-graph decode against eager decoding."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention import DenseAttention, StarAttention
from star_engine.checkpoint import load_model
from star_engine.comm import make_communicator
from star_engine.launch import init_distributed
from star_engine.schedule import Engine
from tests.reference import make_tiny_checkpoint

GPU, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # head_dim 64 so that decoding goes through the extension's kernel and a CUDA graph
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=512)


def request(seed: int = 0, context: int = 1190):
    ids = torch.randint(0, 300, (context + 10,), generator=torch.Generator().manual_seed(seed))
    return ids[:context], ids[context:]


def engine(dist, checkpoint, device, dtype, strategy_cls, cuda_graph=True, **kwargs):
    model = load_model(str(checkpoint), dtype, device)
    comm = make_communicator(dist, device)
    return Engine(model, strategy_cls(dist, comm, **kwargs), comm, dist, max_tokens=2048, cuda_graph=cuda_graph)


@pytest.mark.parametrize("strategy_cls,kwargs", [(DenseAttention, {}), (StarAttention, {"block_size": 300})])
def test_bfloat16_on_the_gpu_follows_float32_on_the_cpu(dist, checkpoint, strategy_cls, kwargs):
    gpu = engine(dist, checkpoint, GPU, torch.bfloat16, strategy_cls, **kwargs).generate(*request(), 8, keep_logits=True)
    cpu = engine(dist, checkpoint, CPU, torch.float32, strategy_cls, **kwargs).generate(*request(), 8, keep_logits=True)
    # Every step's logits; bfloat16 keeps about 3 significant digits. Later steps are fed
    # each side's own tokens, so compare while the tokens agree.
    for step, (got, want) in enumerate(zip(gpu.logits, cpu.logits)):
        assert ((got.cpu() - want).norm() / want.norm()).item() < 3e-2, f"step {step}"
        if gpu.tokens[step] != cpu.tokens[step]:
            break
    assert gpu.tokens[0] == cpu.tokens[0]
    assert gpu.metrics.peak_mem_bytes[0] > 0


def test_decode_replayed_from_a_cuda_graph_equals_eager_decoding(dist, checkpoint):
    graphed = engine(dist, checkpoint, GPU, torch.bfloat16, DenseAttention, cuda_graph=True)
    eager = engine(dist, checkpoint, GPU, torch.bfloat16, DenseAttention, cuda_graph=False)
    for seed, context in [(0, 1190), (1, 700), (2, 1500)]:  # the graph is reused across requests
        a = graphed.generate(*request(seed, context), 12, keep_logits=True)
        b = eager.generate(*request(seed, context), 12, keep_logits=True)
        assert a.tokens == b.tokens
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    assert graphed.decoder.graph is not None and eager.decoder.graph is None
    assert graphed.arena.length(0) == 1500 + 10 + 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_decoded_together_on_the_gpu_get_the_tokens_each_gets_alone(dist, checkpoint, dtype):
    model = load_model(str(checkpoint), dtype, GPU)
    comm = make_communicator(dist, GPU)
    requests = [(*request(seed, context), new) for seed, context, new in [(0, 1190, 9), (1, 700, 4), (2, 1500, 6),
                                                                          (3, 300, 1), (4, 900, 5)]]
    alone = Engine(model, StarAttention(dist, comm, block_size=300), comm, dist, max_tokens=2048, cuda_graph=False)
    want = [alone.generate(c, q, n, stop_at_eos=False).tokens for c, q, n in requests]
    together = Engine(model, StarAttention(dist, comm, block_size=300), comm, dist, max_tokens=2048, batch=3)
    got = dict(together.generate_many([(c, q, together.plan(len(c), len(q), n)) for c, q, n in requests],
                                      stop_at_eos=False))
    if dtype == torch.float32:
        assert [got[i].tokens for i in range(len(requests))] == want
    else:  # bfloat16 products of several rows round apart from one row's; the query pass is each request's own
        assert [got[i].tokens[0] for i in range(len(requests))] == [tokens[0] for tokens in want]
        assert [len(got[i].tokens) for i in range(len(requests))] == [len(tokens) for tokens in want]


def test_a_batch_step_replayed_from_its_cuda_graph_equals_the_eager_batch_step(dist, checkpoint):
    model = load_model(str(checkpoint), torch.bfloat16, GPU)
    comm = make_communicator(dist, GPU)
    requests = [(*request(seed, context), new) for seed, context, new in [(0, 1190, 12), (1, 700, 5), (2, 1500, 9),
                                                                          (3, 300, 7), (4, 900, 10)]]
    answers = {}
    for graphed in (True, False):
        engine = Engine(model, DenseAttention(dist, comm), comm, dist, max_tokens=2048, batch=4, cuda_graph=graphed)
        jobs = [(c, q, engine.plan(len(c), len(q), n)) for c, q, n in requests]
        answers[graphed] = {i: gen.tokens for i, gen in engine.generate_many(jobs, stop_at_eos=False)}
        assert all(decoder.graph is not None for decoder in engine.decoders.values()) == graphed
        assert set(engine.decoders) <= {1, 2, 4}  # three requests are served by a step of four rows
    assert answers[True] == answers[False]
