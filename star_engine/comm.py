"""Communication between ranks: the data plane of the attention strategies.

gather_merge is the one collective of phase 2: every rank contributes its partial
attention (o, lse) over its local keys, and every rank gets the exact attention over the
keys of all ranks. broadcast carries the anchor's K/V and the next token id; send_recv
passes K/V one step around a ring. Under tensor parallelism these run among the ranks
that hold the same heads on every host, and a host's ranks sum and gather the parts of
the model they split (model.HostCollectives).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from . import _C, ops
from .environment import DEFAULT_NCCL_TIMEOUT_S, job_setting, seconds_from_env
from .launch.control import Dist, Place
from .launch.devices import gpu_id
from .model import HostCollectives


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

    def start_send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Callable[[], Tensor]:
        """Starts send_recv and returns the function that completes it (and returns recv), so
        that compute can overlap the transfer. Here the transfer is done before returning."""
        self.send_recv(send, dst, recv, src)
        return lambda: recv

    def synchronize(self, what: str = "this rank's work on its device") -> None:
        """Waits until this rank's communication so far is done; raises PeerTimeout, rather
        than hangs, when a peer is dead or stuck, saying that `what` did not complete.
        (Calls that complete before returning need nothing.)"""

    @property
    def place(self) -> Place:
        """A strategy's place among this communicator's ranks."""
        return Place(self.rank, self.world)


def make_communicator(dist: Dist, device: torch.device) -> Communicator:
    """NCCL between GPUs when the extension has it, else MPI."""
    if device.type == "cuda" and ops.WITH_CUDA:
        return NcclCommunicator(dist, device)
    return MpiCommunicator(dist)


def make_host_group(dist: Dist, device: torch.device) -> HostCollectives:
    """The collectives of the ranks of one host, which split the model: NCCL between GPUs
    when the extension has it, else MPI; dist: the host's ranks."""
    if device.type == "cuda" and ops.WITH_CUDA:
        return NcclHostGroup(dist, device)
    return MpiHostGroup(dist)


class MpiHostGroup:
    """A host's collectives (HostCollectives) over host memory. A sum is an all-gather and
    the same additions in rank order on every rank, so that the ranks of a host keep
    bit-identical hidden states."""

    def __init__(self, dist: Dist) -> None:
        self.dist, self.size = dist, dist.world

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        parts = self.all_gather(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_gather(self, tensor: Tensor) -> Tensor:
        host = _on_cpu(tensor.contiguous())
        gathered = torch.empty((self.size, *host.shape), dtype=host.dtype)
        self.dist.wait(self.dist.mpi.Iallgather(_buffer(host), _buffer(gathered)), "a host all-gather")
        return gathered.to(tensor.device)


class NcclHostGroup:
    """A host's collectives (HostCollectives) over NCCL, enqueued on the current stream
    (capturable in a CUDA graph)."""

    def __init__(self, dist: Dist, device: torch.device) -> None:
        self.nccl = _nccl(dist, device)
        self.size = dist.world

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        self.nccl.all_reduce_sum(tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((self.size, *tensor.shape))
        self.nccl.all_gather(tensor, gathered)
        return gathered


def _nccl(dist: Dist, device: torch.device, timeout_s: float | None = None) -> "_C.NcclComm":
    """An NCCL communicator of dist's ranks (rank 0 makes the id, MPI carries it)."""
    unique_id = _C.NcclComm.make_unique_id() if dist.rank == 0 else None
    unique_id = dist.bcast(unique_id, root=0)
    if timeout_s is None:
        timeout_s = seconds_from_env("STAR_ENGINE_NCCL_TIMEOUT", DEFAULT_NCCL_TIMEOUT_S)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _C.NcclComm(unique_id, dist.rank, dist.world, index, timeout_s)


def _buffer(tensor: Tensor):
    """A writable buffer view of a contiguous CPU tensor of any dtype (bfloat16 too)."""
    if not tensor.is_contiguous():
        raise ValueError("communication buffers must be contiguous")
    return tensor.view(-1).view(torch.uint8).numpy()


def _on_cpu(tensor: Tensor) -> Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


class MpiCommunicator(Communicator):
    """MPI over host memory: how the whole distributed algorithm runs without GPUs.
    Tensors on a GPU are staged through host memory (correct, not fast)."""

    def __init__(self, dist: Dist) -> None:
        self.dist, self.comm = dist, dist.mpi
        self.rank, self.world = dist.rank, dist.world
        self.bytes_sent = 0

    def gather_merge(self, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        dim = o.shape[-1]
        rows = lse.numel()
        if o.numel() != rows * dim:
            raise ValueError(f"gather_merge: o {tuple(o.shape)} does not match lse {tuple(lse.shape)}")
        # One packed float32 message per rank: o's rows, then their lse.
        packed = _on_cpu(torch.cat((o.reshape(-1).float(), lse.reshape(-1).float())))
        gathered = torch.empty(self.world, packed.numel(), dtype=torch.float32)
        self.dist.wait(self.comm.Iallgather(_buffer(packed), _buffer(gathered)), "gather_merge")
        self.bytes_sent += packed.nbytes
        merged_o, merged_lse = ops.lse_merge(gathered[:, : rows * dim].view(self.world, rows, dim),
                                            gathered[:, rows * dim:])
        return merged_o.view(o.shape).to(o.device, o.dtype), merged_lse.view(lse.shape).to(lse.device)

    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        host = _on_cpu(tensor)
        self.dist.wait(self.comm.Ibcast(_buffer(host), root=root), f"a broadcast from rank {root}")
        if self.rank == root:
            self.bytes_sent += tensor.nbytes
        elif host is not tensor:
            tensor.copy_(host)
        return tensor

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Tensor:
        return self.start_send_recv(send, dst, recv, src)()

    def start_send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Callable[[], Tensor]:
        host_send, host_recv = _on_cpu(send), _on_cpu(recv)
        receiving = self.comm.Irecv(_buffer(host_recv), source=src)
        sending = self.comm.Isend(_buffer(host_send), dest=dst)
        self.bytes_sent += send.nbytes

        def complete(_in_flight: Tensor = host_send) -> Tensor:  # keeps the send buffer alive
            self.dist.wait(sending, f"a send to rank {dst}")
            self.dist.wait(receiving, f"a receive from rank {src}")
            if host_recv is not recv:
                recv.copy_(host_recv)
            return recv

        return complete


# Bytes of a slot of the peer-memory exchange, which takes a rank's part of up to half that
# (a decode step's (o, lse) is 8 KB for 32 heads of 128); larger gathers go through NCCL.
PEER_SLOT_BYTES = 64 << 10


class NcclCommunicator(Communicator):
    """NCCL between GPUs. Every call is enqueued on the current stream and returns at once,
    so that a whole decode step can be captured in one CUDA graph.

    With peer_gather (default: on unless STAR_ENGINE_PEER_GATHER=0) and every rank on one
    node with a GPU of its own, small gather_merges (decode) go instead through one kernel
    that writes into the other GPUs' memory (CUDA IPC over NVLink) and merges, without
    NCCL's all-gather protocol and the second launch (faster on 2 and 4 H200s:
    docs/performance.md). Where it cannot be set up NCCL carries every gather, said on
    stderr only if it was asked for explicitly.
    """

    def __init__(self, dist: Dist, device: torch.device, timeout_s: float | None = None,
                 peer_gather: bool | None = None) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.nccl = _nccl(dist, device, timeout_s)
        timeout_s = self.nccl.timeout_s
        self.dist = dist
        self.rank, self.world, self.device = dist.rank, dist.world, device
        self.bytes_sent = 0
        self._side: torch.cuda.Stream | None = None  # for transfers that overlap compute
        asked = job_setting("STAR_ENGINE_PEER_GATHER")
        explicit = peer_gather is True or asked == "1"
        if peer_gather is None:
            peer_gather = asked != "0"
        self.peer = _peer_exchange(dist, device, timeout_s, explicit) if peer_gather else None

    def gather_merge(self, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        # One packed message per rank (o's rows in their own dtype, then their float32 lse),
        # one all-gather, one merge kernel: enqueued by the extension in a single call.
        o, lse = o.contiguous(), lse.float().contiguous()
        self.bytes_sent += o.nbytes + lse.nbytes
        if self.peer is not None and self.peer.slot_holds(o, lse):
            return self.peer.gather_merge(o, lse)
        return self.nccl.gather_merge(o, lse)

    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        self.nccl.broadcast(tensor, root)
        if self.rank == root:
            self.bytes_sent += tensor.nbytes
        return tensor

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Tensor:
        self.nccl.send_recv(send, dst, recv, src)
        self.bytes_sent += send.nbytes
        return recv

    def start_send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> Callable[[], Tensor]:
        # The transfer runs on a side stream, after the work that produced `send`, while
        # the current stream goes on computing; complete() makes the current stream wait.
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self.send_recv(send, dst, recv, src)
        for tensor in (send, recv):  # their memory is not reused before the transfer ends
            tensor.record_stream(self._side)

        def complete() -> Tensor:
            current.wait_stream(self._side)
            return recv

        return complete

    def synchronize(self, what: str = "this rank's work on its GPU") -> None:
        try:
            self.nccl.wait(self.device.index, what)
        except RuntimeError as exc:
            if not self.nccl.failed:
                raise  # a fault of this rank's GPU, not of its peers
            raise self.dist.unresponsive(str(exc), "STAR_ENGINE_NCCL_TIMEOUT") from None
        try:
            if self.peer is not None:
                self.peer.check()
        except RuntimeError as exc:  # its kernel gave up waiting for a peer
            raise self.dist.unresponsive(str(exc), "STAR_ENGINE_NCCL_TIMEOUT") from None


def _peer_exchange(dist: Dist, device: torch.device, timeout_s: float, explicit: bool) -> "_C.PeerExchange | None":
    """The peer-memory exchange, connected on every rank, or None on every rank (and rank 0
    says why on stderr if it was asked for explicitly): with ranks on several nodes, two
    ranks on one GPU, or where any rank cannot map the others' memory."""
    # One node, and one GPU per rank: two ranks' kernels on one GPU could wait for each other.
    places = dist.allgather(gpu_id(device))  # "node:GPU"
    if dist.world == 1:
        return None  # nothing to exchange
    if len({place.split(":", 1)[0] for place in places}) > 1:
        return _without_peer_exchange(dist, explicit, "the ranks are on several nodes")
    if len(set(places)) < dist.world:
        return _without_peer_exchange(dist, explicit, "two ranks share a GPU")
    exchange, error = None, None
    try:
        exchange = _C.PeerExchange(dist.rank, dist.world, device.index, PEER_SLOT_BYTES, timeout_s)
    except (RuntimeError, ValueError) as exc:  # CUDA refused, or more ranks than it serves
        error = str(exc)
    handles = dist.allgather(exchange.handle() if exchange is not None else None)
    if exchange is not None and None not in handles:
        try:
            exchange.connect(handles)
        except RuntimeError as exc:
            error = str(exc)
    errors = dist.allgather(error)
    failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
    if failed:
        return _without_peer_exchange(dist, explicit, "; ".join(failed))
    return exchange


def _without_peer_exchange(dist: Dist, explicit: bool, reason: str) -> None:
    if explicit and dist.rank == 0:
        print(f"star_engine: peer gather asked for but not used ({reason}); NCCL carries "
              "every gather_merge", file=sys.stderr, flush=True)
    return None
