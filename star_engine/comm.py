"""Communication between ranks: the data plane of the attention strategies.

gather_merge is the one collective of phase 2: every rank contributes its partial
attention (o, lse) over its local keys, and every rank gets the exact attention over the
keys of all ranks. broadcast carries the anchor's K/V and the next token id; send_recv
passes K/V one step around a ring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from . import _C
from .launch import mpi_wait


class Communicator(ABC):
    rank: int
    world: int
    bytes_sent: int  # payload this rank has put on the wire, for the metrics

    @abstractmethod
    def gather_merge(self, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        """Exchanges partial attention o [..., D], lse [...] (float32) of every rank in one
        collective and returns the log-sum-exp merge of all of them: (o, lse), same shapes."""

    @abstractmethod
    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        """Overwrites `tensor` (contiguous) on every rank with root's; returns it."""

    @abstractmethod
    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Tensor:
        """Sends `send` to rank dst while receiving into `recv` (contiguous) from rank src;
        both at once, so that a ring of ranks cannot deadlock. Returns recv."""


def _buffer(tensor: Tensor):
    """A writable buffer view of a contiguous CPU tensor of any dtype (bfloat16 too)."""
    if not tensor.is_contiguous():
        raise ValueError("communication buffers must be contiguous")
    return tensor.view(-1).view(torch.uint8).numpy()


def _host(tensor: Tensor) -> Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


class MpiCommunicator(Communicator):
    """MPI over host memory: how the whole distributed algorithm runs without GPUs.
    Tensors on a GPU are staged through host memory (correct, not fast)."""

    def __init__(self, mpi_comm) -> None:
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.world = mpi_comm.Get_size()
        self.bytes_sent = 0

    def gather_merge(self, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        dim = o.shape[-1]
        rows = lse.numel()
        if o.numel() != rows * dim:
            raise ValueError(f"gather_merge: o {tuple(o.shape)} does not match lse {tuple(lse.shape)}")
        # One packed float32 message per rank: o's rows, then their lse.
        packed = _host(torch.cat((o.reshape(-1).float(), lse.reshape(-1).float())))
        gathered = torch.empty(self.world, packed.numel(), dtype=torch.float32)
        mpi_wait(self.comm.Iallgather(_buffer(packed), _buffer(gathered)))
        self.bytes_sent += packed.nbytes
        merged_o, merged_lse = _C.lse_merge(gathered[:, : rows * dim].view(self.world, rows, dim),
                                            gathered[:, rows * dim:])
        return merged_o.view(o.shape).to(o.device, o.dtype), merged_lse.view(lse.shape).to(lse.device)

    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        host = _host(tensor)
        mpi_wait(self.comm.Ibcast(_buffer(host), root=root))
        if self.rank == root:
            self.bytes_sent += tensor.nbytes
        elif host is not tensor:
            tensor.copy_(host)
        return tensor

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Tensor:
        host_recv = _host(recv)
        receiving = self.comm.Irecv(_buffer(host_recv), source=src)
        mpi_wait(self.comm.Isend(_buffer(_host(send)), dest=dst))
        mpi_wait(receiving)
        if host_recv is not recv:
            recv.copy_(host_recv)
        self.bytes_sent += send.nbytes
        return recv
