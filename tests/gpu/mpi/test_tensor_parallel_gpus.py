"""Hosts of GPUs that split the model (NCCL all-reduces, captured in the decode step's CUDA
graph) against the CPU engine and against the unsplit model: 2 GPUs as one host of 2, 4
as two hosts of 2."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_config, load_model
from star_engine.comm import MpiCommunicator, MpiHostGroup, NcclHostGroup, make_communicator, make_host_group
from star_engine.engine import Engine
from star_engine.hosts import Hosts
from star_engine.launch.devices import select_device
from star_engine.settings import KVCacheSettings
from tests.gpu.mpi.test_engine_gpus import checkpoint  # noqa: F401 - a fixture
from tests.reference import causal_attention

TP = 2


@pytest.fixture(scope="module")
def hosts(dist):
    if dist.world % TP:
        pytest.skip(f"{dist.world} GPUs do not form hosts of {TP}")
    return Hosts(dist, TP)


@pytest.fixture(scope="module")
def on_gpus(dist, hosts, checkpoint):  # noqa: F811
    device = select_device("cuda", dist)
    model = load_model(str(checkpoint), torch.bfloat16, device, shard=hosts.shard(load_config(str(checkpoint))),
                       host=make_host_group(hosts.members, device))
    return model, make_communicator(hosts.peers, device)


@pytest.fixture(scope="module")
def on_cpus(hosts, checkpoint):  # noqa: F811
    model = load_model(str(checkpoint), torch.float32, torch.device("cpu"),
                       shard=hosts.shard(load_config(str(checkpoint))), host=MpiHostGroup(hosts.members))
    return model, MpiCommunicator(hosts.peers)


def engine(dist, hosts, model, comm, strategy_cls, cuda_graph=True, **kwargs):
    return Engine(model, strategy_cls(hosts.place, comm, **kwargs), comm, dist, KVCacheSettings(2048), cuda_graph)


def answer(engine):
    ids = torch.randint(0, 300, (1210,), generator=torch.Generator().manual_seed(4))
    return engine.generate(ids[:1200], ids[1200:], 10, keep_logits=True)


def run(dist, hosts, model, comm, strategy_cls, cuda_graph=True, **kwargs):
    return answer(engine(dist, hosts, model, comm, strategy_cls, cuda_graph, **kwargs))


@pytest.mark.parametrize("strategy_cls,kwargs", [(DenseAttention, {}), (RingAttention, {}),
                                                 (StarAttention, {"block_size": 256})])
def test_hosts_of_gpus_follow_the_cpu_engine_split_the_same_way(dist, hosts, on_gpus, on_cpus, strategy_cls, kwargs):
    on_gpu = run(dist, hosts, *on_gpus, strategy_cls, **kwargs)
    on_cpu = run(dist, hosts, *on_cpus, strategy_cls, **kwargs)
    assert all(t == on_gpu.tokens for t in dist.allgather(on_gpu.tokens))
    if hosts.place.is_query_rank:
        for step, (got, want) in enumerate(zip(on_gpu.logits, on_cpu.logits)):
            assert ((got.cpu() - want).norm() / want.norm()).item() < 3e-2, f"step {step}"
            if on_gpu.tokens[step] != on_cpu.tokens[step]:
                break


def test_a_decode_step_with_its_all_reduces_replays_from_a_cuda_graph_as_it_runs_eagerly(dist, hosts, on_gpus):
    graphed = engine(dist, hosts, *on_gpus, StarAttention, cuda_graph=True, block_size=256)
    eager = engine(dist, hosts, *on_gpus, StarAttention, cuda_graph=False, block_size=256)
    assert answer(graphed).tokens == answer(eager).tokens
    assert graphed.decoder.graphs and not eager.decoder.graphs
    model, _ = on_gpus
    assert isinstance(model.host, NcclHostGroup)  # the all-reduces the graph captured are NCCL's


def test_a_split_model_on_gpus_gives_the_unsplit_models_logits(dist, hosts, on_gpus, checkpoint):  # noqa: F811
    model, _ = on_gpus
    device = model.embed.weight.device
    whole = load_model(str(checkpoint), torch.bfloat16, device)
    ids = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(2)).to(device)
    positions = torch.arange(64, device=device)

    got = model.logits(model(ids, positions, causal_attention))
    want = whole.logits(whole(ids, positions, causal_attention))
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert all(torch.equal(got.cpu(), other) for other in hosts.members.allgather(got.cpu()))
