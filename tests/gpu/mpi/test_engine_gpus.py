"""Star, ring and dense over several GPUs (NCCL, CUDA-graph decode) against the CPU engine."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_model
from star_engine.comm import MpiCommunicator, NcclCommunicator
from star_engine.engine import Engine
from star_engine.launch.devices import select_device
from star_engine.settings import KVCacheSettings
from tests.reference import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(dist):
    path = None
    if dist.rank == 0:  # head_dim 64: the decode kernel and the CUDA graph serve it
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp()), hidden_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=512)
    return dist.bcast(path, root=0)


@pytest.fixture(scope="module")
def gpu(dist):
    device = select_device("cuda", dist)
    return device, NcclCommunicator(dist, device)


def run(dist, comm, model, strategy_cls, cuda_graph=True, **kwargs):
    ids = torch.randint(0, 300, (1210,), generator=torch.Generator().manual_seed(4))
    engine = Engine(model, strategy_cls(dist, comm, **kwargs), comm, dist, KVCacheSettings(2048), cuda_graph)
    return engine.generate(ids[:1200], ids[1200:], 10, keep_logits=True)


@pytest.mark.parametrize("strategy_cls,kwargs", [(DenseAttention, {}), (RingAttention, {}),
                                                 (StarAttention, {"block_size": 256}),
                                                 (StarAttention, {"block_size": 256, "anchor_mode": "recompute"})])
def test_gpus_follow_the_cpu_engine(dist, comm: MpiCommunicator, gpu, checkpoint, strategy_cls, kwargs):
    device, nccl = gpu
    on_gpu = run(dist, nccl, load_model(str(checkpoint), torch.bfloat16, device), strategy_cls, **kwargs)
    on_cpu = run(dist, comm, load_model(str(checkpoint), torch.float32, torch.device("cpu")), strategy_cls, **kwargs)
    assert all(t == on_gpu.tokens for t in dist.allgather(on_gpu.tokens))
    if dist.is_query_rank:
        for step, (got, want) in enumerate(zip(on_gpu.logits, on_cpu.logits)):
            assert ((got.cpu() - want).norm() / want.norm()).item() < 3e-2, f"step {step}"
            if on_gpu.tokens[step] != on_cpu.tokens[step]:
                break


def test_graph_replay_equals_eager_over_nccl(dist, gpu, checkpoint):
    device, nccl = gpu
    model = load_model(str(checkpoint), torch.bfloat16, device)
    graphed = run(dist, nccl, model, StarAttention, cuda_graph=True, block_size=256)
    eager = run(dist, nccl, model, StarAttention, cuda_graph=False, block_size=256)
    assert graphed.tokens == eager.tokens
    for x, y in zip(graphed.logits, eager.logits):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
