"""The engine on one GPU (bfloat16) against the same engine on the CPU (float32)."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention import DenseAttention, StarAttention
from star_engine.checkpoint import load_model
from star_engine.comm import make_communicator
from star_engine.launch import init_distributed
from star_engine.schedule import Engine
from tests.reference import make_tiny_checkpoint

GPU, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # head_dim 64 so that decoding goes through the extension's kernel
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=512)


def generate(dist, checkpoint, device, dtype, strategy_cls, **kwargs):
    model = load_model(str(checkpoint), dtype, device)
    comm = make_communicator(dist, device)
    engine = Engine(model, strategy_cls(dist, comm, **kwargs), comm, dist, max_tokens=2048)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (1200,), generator=gen)
    return engine.generate(ids[:1190], ids[1190:], 8, keep_logits=True)


@pytest.mark.parametrize("strategy_cls,kwargs", [(DenseAttention, {}), (StarAttention, {"block_size": 300})])
def test_bfloat16_on_the_gpu_follows_float32_on_the_cpu(dist, checkpoint, strategy_cls, kwargs):
    gpu = generate(dist, checkpoint, GPU, torch.bfloat16, strategy_cls, **kwargs)
    cpu = generate(dist, checkpoint, CPU, torch.float32, strategy_cls, **kwargs)
    # Logits of the first step: bfloat16 keeps about 3 significant digits.
    got, want = gpu.logits[0].cpu(), cpu.logits[0]
    assert ((got - want).norm() / want.norm()).item() < 3e-2
    assert gpu.tokens[0] == cpu.tokens[0]
    assert gpu.metrics.peak_mem_bytes[0] > 0
