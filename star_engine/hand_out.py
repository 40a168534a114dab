"""Requests side by side: rank 0 hands each request to a group of hosts of its size
(dispatch.py decides which and when), from a thread of its own so that no group waits for
work while rank 0 computes in a group of its own; every rank works in the group it is
ordered into, with that group's engine (its continuous batch, its contexts encoded once),
until the group has no more work, then waits for its next order. Answers come back to rank
0 as each request finishes.

The messages, over a communicator of their own: to rank 0, a group's request for work
(saying whether a rank of it was asked to stop), an answer, a group's release, and an idle
rank's stop; from rank 0, an order (join a group, or the end) and a request (or none: the
group drains). Every other wait is a collective inside a group, bounded as elsewhere.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .dispatch import LATER, Dispatch, Group, read_ahead
from .launch.control import PeerTimeout

if TYPE_CHECKING:
    from torch import Tensor

    from .engine import Engine, Generation
    from .groups import HostGroup, HostGroups
    from .launch.control import Dist
    from .launch.stopping import GracefulStop
    from .request_plan import RequestPlan

_ASK, _ANSWER, _RELEASED, _STOP, _ORDER, _GIVE = range(1, 7)  # message tags


@dataclass(frozen=True)
class Work:
    """A request as rank 0 hands it out: its number, its token ids (context None: the same
    as the request the group had before), its plan on a group of `hosts` hosts, its cost
    there, what the caller needs back with its answer, and what names its context (the
    same for the requests about one; None: a context of its own)."""
    number: int
    context_ids: list[int] | None
    query_ids: list[int]
    plan: RequestPlan
    hosts: int
    cost: float  # its predicted seconds on its group, which groups of a size are balanced by
    about: Any = None
    context_key: Hashable = None


@dataclass(frozen=True)
class Done:
    """A request's answer as rank 0 receives it: on which group, and when (seconds since
    the epoch) its group took it and finished it."""
    work: Work
    generation: Generation
    group: Group
    started: float
    finished: float


@dataclass(frozen=True)
class Served:
    stopped: bool  # a rank was asked to stop: requests were left
    wall_s: float
    busy_s: list[float]  # by rank: seconds spent in a group


def serve(dist: Dist, groups: HostGroups, engines: dict[int, Engine], stop: GracefulStop,
          source: Iterator[Work] | None, on_done: Callable[[Done], None] | None, batch: int,
          on_hand_out: Callable[[Work, Group], None] | None = None, stop_at_eos: bool = True) -> Served:
    """Every rank: the requests of `source` (rank 0's; None elsewhere) answered on the groups
    their `hosts` name, each group decoding up to `batch` together; on_done and on_hand_out
    run on rank 0, in its hand-out thread, for each. Ends once every request is answered, or
    after a stop once the work in hand is. stop_at_eos=False: every answer as long as its
    max_new_tokens (benchmarks)."""
    # One communicator each way: rank 0 is both the hand-out's thread and a worker, and
    # neither may take the other's messages.
    to_hand_out, to_ranks = dist.mpi.Dup(), dist.mpi.Dup()
    thread = None
    if dist.rank == 0:
        hand_out = _HandOut(to_hand_out, to_ranks, groups.count, groups.tp, source, on_done, on_hand_out, stop,
                            read_ahead(batch, groups.count))
        thread = threading.Thread(target=hand_out.run, name="star_engine hand-out", daemon=True)
        thread.start()
    orders = _Orders(to_hand_out, to_ranks, stop, dist.timeout_s)
    start, busy = time.perf_counter(), 0.0
    while (size := orders.next_group()) is not None:
        began = time.perf_counter()
        _work_in(groups.by_size[size], engines[size], orders, stop, stop_at_eos)
        busy += time.perf_counter() - began
    wall = time.perf_counter() - start
    if thread is not None:
        thread.join()
    every = dist.allgather(busy)
    to_hand_out.Free()
    to_ranks.Free()
    return Served(orders.stopped, wall, every)


def answered(engine: Engine, requests: Iterator[tuple[Tensor, Tensor, RequestPlan]], stop_at_eos: bool = True
             ) -> Iterator[tuple[int, Generation]]:
    """(index among `requests`, answer) of each request (context ids, query ids, plan): one
    at a time, each context encoded once for the requests after it that share it, or up to
    the engine's batch decoding together, in the order they finish."""
    if engine.batch > 1:
        yield from engine.generate_many(requests, stop_at_eos=stop_at_eos)
        return
    for index, (context, query, plan) in enumerate(requests):
        yield index, engine.generate(context, query, plan.max_new_tokens, plan=plan, reuse_context=True,
                                     stop_at_eos=stop_at_eos)


def _work_in(group: HostGroup, engine: Engine, orders: _Orders, stop: GracefulStop, stop_at_eos: bool) -> None:
    """This rank's part in a group's work: the requests rank 0 gives it, until none."""
    import torch

    engine.unpark()
    taken: dict[int, tuple[Work, float]] = {}  # by index among the group's requests, until answered
    numbers = itertools.count()

    def requests() -> Iterator[tuple[Tensor, Tensor, RequestPlan] | object]:
        from .engine import LATER as LATER_FOR_THE_ENGINE

        context = None
        while True:
            asked_to_stop = group.dist.any(stop.requested)
            work = orders.ask(group.group, asked_to_stop) if group.leader else None
            work = group.dist.bcast(work, root=0)
            if work is None:
                return
            if work == LATER:
                yield LATER_FOR_THE_ENGINE
                continue
            if work.context_ids is not None:
                context = torch.as_tensor(work.context_ids)
            taken[next(numbers)] = (work, time.time())
            yield context, torch.as_tensor(work.query_ids), work.plan

    for index, generation in answered(engine, requests(), stop_at_eos):
        work, started = taken.pop(index)
        if group.leader:
            orders.send(_ANSWER, (work.number, generation, group.group, started, time.time()))
    engine.park()
    asked_to_stop = group.dist.any(stop.requested)
    if group.leader:
        orders.send(_RELEASED, (group.group, asked_to_stop))


class _Orders:
    """A rank's side of the messages: orders from rank 0, and its group's requests for work."""

    def __init__(self, to_hand_out: Any, to_ranks: Any, stop: GracefulStop, timeout_s: float) -> None:
        self.to_hand_out, self.to_ranks, self.stop, self.timeout_s = to_hand_out, to_ranks, stop, timeout_s
        self.stopped = False
        self._stop_said = False
        self._sending: list[Any] = []

    def next_group(self) -> int | None:
        """The size of the group to work in next; None: the job ends."""
        order = self._receive(_ORDER, patience=None)
        if order[0] == "end":
            self.stopped = order[1]
            return None
        return order[1]

    def ask(self, group: Group, asked_to_stop: bool) -> Work | str | None:
        self.send(_ASK, (group, asked_to_stop))
        return self._receive(_GIVE, patience=self.timeout_s)

    def send(self, tag: int, message: Any) -> None:
        self._sending = _sent(self._sending, self.to_hand_out, message, 0, tag)

    def _receive(self, tag: int, patience: float | None) -> Any:
        """The next message from rank 0 with `tag`. Waiting for an order, without bound (a long
        phase 1 elsewhere may take hours), saying rank 0 a stop once; for work, `patience`."""
        deadline = None if patience is None else time.monotonic() + patience
        pause = 5e-5
        while not self.to_ranks.Iprobe(source=0, tag=tag):
            if patience is None and self.stop.requested and not self._stop_said:
                self._stop_said = True
                self.send(_STOP, None)
            if deadline is not None and time.monotonic() > deadline:
                raise PeerTimeout(f"rank 0 handed out no work for {patience:g} s (STAR_ENGINE_MPI_TIMEOUT)",
                                  speaker=True)
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
        return self.to_ranks.recv(source=0, tag=tag)


class _HandOut:
    """Rank 0's thread: reads the requests ahead, follows Dispatch, and passes the answers on."""

    def __init__(self, to_hand_out: Any, to_ranks: Any, hosts: int, tp: int, source: Iterator[Work] | None,
                 on_done: Callable[[Done], None] | None, on_hand_out: Callable[[Work, Group], None] | None,
                 stop: GracefulStop, lookahead: int) -> None:
        self.to_hand_out, self.to_ranks, self.tp, self.stop = to_hand_out, to_ranks, tp, stop
        self.source, self.on_done, self.on_hand_out = source, on_done, on_hand_out
        self.lookahead = lookahead
        self.dispatch = Dispatch(hosts, patience=lookahead)
        self.waiting: dict[int, Work] = {}  # read, not yet handed out
        self.in_hand: dict[int, Work] = {}
        self.last_context: dict[Group, list[int] | None] = {}
        self.exhausted = source is None
        self._sending: list[Any] = []

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - rank 0's failure ends the job, said as elsewhere
            expected = isinstance(exc, (ValueError, OSError)) and not os.environ.get("STAR_ENGINE_TRACEBACK")
            sys.stderr.write(("" if expected else traceback.format_exc())
                             + f"star_engine: rank 0: {type(exc).__name__}: {exc}\n")
            from .launch.ending import end_job

            end_job(1, force=True)

    def _serve(self) -> None:
        ranks = self.dispatch.hosts * self.tp
        while True:
            progressed = self._receive_all()
            if self.stop.requested and not self.dispatch.stopped:
                self.dispatch.stop()
            for group in self.dispatch.start():
                self.last_context[group] = None
                for rank in self._ranks_of(group):
                    self._send(("group", group.size), rank, _ORDER)
            if self.dispatch.done and (self.exhausted or self.dispatch.stopped):
                for rank in range(ranks):
                    self._send(("end", self.dispatch.stopped), rank, _ORDER)
                break
            if not progressed and not self._read_one():
                time.sleep(5e-4)
        while self._sending:
            self._sending = [request for request in self._sending if not request.Test()]
            time.sleep(1e-4)

    def _receive_all(self) -> bool:
        from mpi4py import MPI

        status, received = MPI.Status(), False
        while self.to_hand_out.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            message = self.to_hand_out.recv(source=source, tag=tag)
            received = True
            if tag == _ASK:
                group, asked_to_stop = message
                if asked_to_stop:
                    self.dispatch.stop()
                self._send(self._give(group), source, _GIVE)
            elif tag == _ANSWER:
                number, generation, group, started, finished = message
                self.dispatch.answered(group, number)
                if self.on_done is not None:
                    self.on_done(Done(self.in_hand.pop(number), generation, group, started, finished))
            elif tag == _RELEASED:
                group, asked_to_stop = message
                if asked_to_stop:
                    self.dispatch.stop()
                self.dispatch.release(group)
            elif tag == _STOP:
                self.dispatch.stop()
        return received

    def _give(self, group: Group) -> Work | str | None:
        """The group's next request (its context left out where the group has it already),
        LATER, or None."""
        while not self.exhausted and not self.dispatch.waiting_for(group.size) and self._read_one():
            pass
        number = self.dispatch.give(group)
        if number is None or number == LATER:
            return number
        work = self.waiting.pop(number)
        self.in_hand[number] = work
        if self.on_hand_out is not None:
            self.on_hand_out(work, group)
        same = work.context_ids == self.last_context[group]
        self.last_context[group] = work.context_ids
        return replace(work, context_ids=None) if same else work

    def _read_one(self) -> bool:
        """Reads one more request, unless enough are read ahead or none are left."""
        if self.exhausted or len(self.waiting) >= self.lookahead or self.dispatch.stopped:
            return False
        work = next(self.source, None)
        if work is None:
            self.exhausted = True
            return False
        self.waiting[work.number] = work
        self.dispatch.add(work.number, work.hosts, work.cost, work.context_key)
        return True

    def _ranks_of(self, group: Group) -> range:
        return range(group.first * self.tp, (group.first + group.size) * self.tp)

    def _send(self, message: Any, rank: int, tag: int) -> None:
        self._sending = _sent(self._sending, self.to_ranks, message, rank, tag)


def _sent(sending: list[Any], comm: Any, message: Any, dest: int, tag: int) -> list[Any]:
    """The sends still in flight, the completed ones dropped, after a new one of `message`."""
    return [request for request in sending if not request.Test()] + [comm.isend(message, dest=dest, tag=tag)]
