"""The control plane between ranks: small Python objects over MPI (requests, metrics,
barriers), every wait of which is bounded, and the errors of a job that cannot go on."""

from __future__ import annotations

import pickle
import time
from typing import Any

# Seconds a rank waits for its peers in one MPI operation before it ends the job.
DEFAULT_MPI_TIMEOUT_S = 600.0
# Seconds the ranks that ran out of patience give the others to answer "are you there?".
PING_WINDOW_S = 5.0
_PING, _PONG = 1, 2  # message tags of "are you there?" and its answer


class JobError(ValueError):
    """A problem every rank finds the same (how the processes were started, what the job
    asks for), before anything is computed: one rank says it."""


class PeerTimeout(RuntimeError):
    """A peer did not take part in an MPI operation within the timeout."""

    def __init__(self, message: str, speaker: bool) -> None:
        super().__init__(message)
        self.speaker = speaker  # the one rank of those still answering that reports it


class Place:
    """A rank's place in a job of `world` ranks, what a strategy's layout depends on. The
    last rank holds the query, appends generated tokens and decides them."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def query_rank(self) -> int:
        return self.world - 1

    @property
    def is_query_rank(self) -> bool:
        return self.rank == self.query_rank


class Dist(Place):
    """This process's place in the job, and the control plane between ranks (small Python
    objects over MPI: requests, metrics, barriers), every wait of which is bounded."""

    def __init__(self, mpi: Any, local_rank: int, local_world: int, node_leader: int, timeout_s: float) -> None:
        """node_leader: the lowest rank of this rank's node, which names the node."""
        super().__init__(mpi.Get_rank(), mpi.Get_size())
        self.mpi = mpi  # mpi4py.MPI.Comm of all ranks
        self.local_rank, self.local_world = local_rank, local_world  # among the ranks of this node
        self.timeout_s = timeout_s
        self._pings = mpi.Dup()  # where waiting ranks ask each other whether they are alive
        self._pongs: list[Any] = []
        leaders = self.allgather(node_leader)
        self.node_of = tuple(sorted(set(leaders)).index(leader) for leader in leaders)  # by rank: 0, 1, ...
        self.nodes = len(set(leaders))

    def group(self, color: int | None, key: int) -> "Dist | None":
        """The ranks that pass the same color, numbered by key: a Dist of their own (every
        rank of this one must call it; those that pass None get None)."""
        from mpi4py import MPI

        sub = self.mpi.Split(MPI.UNDEFINED if color is None else color, key)
        if color is None:
            return None
        nodes = sub.allgather(self.node_of[self.rank])
        mine = [r for r, node in enumerate(nodes) if node == nodes[sub.Get_rank()]]
        return Dist(sub, mine.index(sub.Get_rank()), len(mine), self.node_of[self.rank], self.timeout_s)

    def sync(self) -> None:
        """A barrier."""
        self.wait(self.mpi.Ibarrier(), "a barrier")

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """root's obj (any picklable object) on every rank."""
        from mpi4py import MPI

        data = pickle.dumps(obj) if self.rank == root else b""
        size = bytearray(len(data).to_bytes(8, "little"))
        self.wait(self.mpi.Ibcast([size, MPI.BYTE], root=root), "a broadcast")
        buf = bytearray(data) if self.rank == root else bytearray(int.from_bytes(size, "little"))
        self.wait(self.mpi.Ibcast([buf, MPI.BYTE], root=root), "a broadcast")
        return obj if self.rank == root else pickle.loads(buf)

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        from mpi4py import MPI

        data = pickle.dumps(obj)
        sizes = bytearray(8 * self.world)
        self.wait(self.mpi.Iallgather([len(data).to_bytes(8, "little"), MPI.BYTE], [sizes, MPI.BYTE]),
                  "an all-gather")
        counts = [int.from_bytes(sizes[8 * r: 8 * r + 8], "little") for r in range(self.world)]
        displacements = [sum(counts[:r]) for r in range(self.world)]
        gathered = bytearray(sum(counts))
        self.wait(self.mpi.Iallgatherv([data, MPI.BYTE], [gathered, (counts, displacements), MPI.BYTE]),
                  "an all-gather")
        return [pickle.loads(gathered[d: d + c]) for d, c in zip(displacements, counts)]

    def any(self, flag: bool) -> bool:
        """Whether flag is true on some rank."""
        return any(self.allgather(bool(flag)))

    def wait(self, request: Any, what: str) -> None:
        """Completes an MPI request; if the peers have not completed it within timeout_s,
        finds out which of them no longer answer and raises PeerTimeout naming them.

        Polls briefly, then sleeps between polls: MPI's blocking calls spin, and with more
        ranks than cores (CI, laptops) the waiting ranks would starve the one that computes.
        While it waits, a rank answers the others' "are you there?".
        """
        deadline = time.perf_counter() + 2e-4
        while not request.Test():
            if time.perf_counter() > deadline:
                break
        else:
            return
        deadline = time.monotonic() + self.timeout_s
        pause = 5e-5
        while not request.Test():
            self._answer_pings()
            if time.monotonic() > deadline:
                self._no_progress(what)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _answer_pings(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while self._pings.Iprobe(MPI.ANY_SOURCE, _PING, status):
            source = status.Get_source()
            self._pings.Recv([bytearray(1), MPI.BYTE], source, _PING)
            self._pongs.append(self._pings.Isend([b"!", MPI.BYTE], source, _PONG))
        self._pongs = [request for request in self._pongs if not request.Test()]

    def _no_progress(self, what: str) -> None:
        raise self.unresponsive(f"no progress for {self.timeout_s:g} s in {what}", "STAR_ENGINE_MPI_TIMEOUT")

    def unresponsive(self, waited: str, timeout_var: str) -> PeerTimeout:
        """A PeerTimeout for a wait that ran out (`waited` says which): asks every other rank
        whether it is there (those waiting answer) and names those that did not."""
        from mpi4py import MPI

        others = [r for r in range(self.world) if r != self.rank]
        replies = {r: bytearray(1) for r in others}
        receiving = {r: self._pings.Irecv([replies[r], MPI.BYTE], r, _PONG) for r in others}
        asking = [self._pings.Isend([b"?", MPI.BYTE], r, _PING) for r in others]
        end = time.monotonic() + PING_WINDOW_S
        while time.monotonic() < end and not all(request.Test() for request in [*receiving.values(), *asking]):
            self._answer_pings()
            time.sleep(1e-3)
        silent = [r for r, request in receiving.items() if not request.Test()]
        answering = sorted({self.rank, *(r for r in others if r not in silent)})
        if silent:
            message = (f"{waited}: {ranks_named(silent)} did not answer (stopped, "
                       f"hung, dead, or busy longer than {timeout_var})")
        elif others:
            message = f"{waited}, while every rank answers: the ranks wait in different operations"
        else:
            message = waited
        return PeerTimeout(message, speaker=answering[0] == self.rank)


def ranks_named(ranks: list[int]) -> str:
    """'rank 2', 'ranks 1, 3': some ranks of a job, as messages name them."""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
