"""NCCL communicator on N GPUs, one rank each: the same results as MPI."""

from __future__ import annotations

import pytest
import torch

from star_engine.comm import MpiCommunicator, NcclCommunicator
from star_engine.launch.devices import select_device


@pytest.fixture(scope="module")
def nccl(dist):
    return NcclCommunicator(dist, select_device("cuda", dist), peer_gather=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nccl_gather_merge_equals_the_mpi_result(dist, comm: MpiCommunicator, nccl, dtype):
    gen = torch.Generator().manual_seed(dist.rank)
    o = torch.randn(32, 1, 128, generator=gen).to(dtype)
    lse = torch.randn(32, 1, generator=gen) * 3
    if dist.rank == 0:
        lse[:] = float("-inf")  # a rank without keys
    want_o, want_lse = comm.gather_merge(o, lse)
    got_o, got_lse = nccl.nccl.gather_merge(o.cuda(), lse.cuda())  # the NCCL path, whatever the size
    nccl.synchronize()
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_o.cpu().float(), want_o.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_peer_gather_merge_equals_the_mpi_result(dist, comm: MpiCommunicator, nccl, dtype):
    if nccl.peer is None:
        pytest.skip("one rank, or ranks that cannot map each other's memory")
    gen = torch.Generator().manual_seed(dist.rank)
    o = torch.randn(32, 1, 128, generator=gen).to(dtype)
    lse = torch.randn(32, 1, generator=gen) * 3
    if dist.rank == 0:
        lse[:] = float("-inf")  # a rank without keys
        o[:] = float("nan")  # whose o may hold anything
    want_o, want_lse = comm.gather_merge(o, lse)
    got_o, got_lse = nccl.peer.gather_merge(o.cuda(), lse.cuda())
    nccl.synchronize()
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_o.cpu().float(), want_o.float(), atol=1e-2, rtol=1e-2)


def test_peer_gather_merge_replayed_from_a_cuda_graph_follows_its_inputs(dist, nccl):
    """Calls of a captured graph, replayed many times: each replay is a new exchange (the
    epochs and the two parities of slots must stay in step on every rank)."""
    if nccl.peer is None:
        pytest.skip("one rank, or ranks that cannot map each other's memory")
    o = torch.zeros(32, 1, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.zeros(32, 1, device="cuda")
    nccl.gather_merge(o, lse)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [nccl.gather_merge(o, lse) for _ in range(3)]
    for replay in range(5):
        gen = torch.Generator().manual_seed(100 * replay + dist.rank)
        o.copy_(torch.randn(o.shape, generator=gen))
        lse.copy_(torch.randn(lse.shape, generator=gen))
        graph.replay()
        want_o, want_lse = nccl.nccl.gather_merge(o, lse)
        nccl.synchronize()
        for got_o, got_lse in outputs:
            torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_o.float(), want_o.float(), atol=1e-2, rtol=1e-2)


def test_nccl_broadcast_and_ring_step(dist, nccl):
    t = torch.full((1000,), float(dist.rank), device="cuda")
    nccl.broadcast(t, root=dist.world - 1)
    recv = torch.empty(4096, device="cuda")
    nccl.send_recv(torch.full((4096,), float(dist.rank), device="cuda"), (dist.rank + 1) % dist.world,
                   recv, (dist.rank - 1) % dist.world)
    nccl.synchronize()
    assert (t == dist.world - 1).all()
    assert (recv == (dist.rank - 1) % dist.world).all()
