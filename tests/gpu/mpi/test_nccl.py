"""NCCL communicator on N GPUs, one rank each: the same results as MPI."""

from __future__ import annotations

import pytest
import torch

from star_engine.comm import MpiCommunicator, NcclCommunicator
from star_engine.launch import select_device


@pytest.fixture(scope="module")
def nccl(dist):
    return NcclCommunicator(dist, select_device("cuda", dist))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nccl_gather_merge_equals_the_mpi_result(dist, comm: MpiCommunicator, nccl, dtype):
    gen = torch.Generator().manual_seed(dist.rank)
    o = torch.randn(32, 1, 128, generator=gen).to(dtype)
    lse = torch.randn(32, 1, generator=gen) * 3
    if dist.rank == 0:
        lse[:] = float("-inf")  # a rank without keys
    want_o, want_lse = comm.gather_merge(o, lse)
    got_o, got_lse = nccl.gather_merge(o.cuda(), lse.cuda())
    nccl.synchronize()
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_o.cpu().float(), want_o.float(), atol=1e-2, rtol=1e-2)


def test_nccl_broadcast_and_ring_step(dist, nccl):
    t = torch.full((1000,), float(dist.rank), device="cuda")
    nccl.broadcast(t, root=dist.world - 1)
    recv = torch.empty(4096, device="cuda")
    nccl.send_recv(torch.full((4096,), float(dist.rank), device="cuda"), (dist.rank + 1) % dist.world,
                   recv, (dist.rank - 1) % dist.world)
    nccl.synchronize()
    assert (t == dist.world - 1).all()
    assert (recv == (dist.rank - 1) % dist.world).all()
