"""How a job ends: a problem found before the work is said once, by rank 0, and the ranks
leave together; an exception on any rank, or a peer that stops answering, ends every rank
promptly with one message."""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from .control import JobError, PeerTimeout, ranks_named
from .launcher import alone, env_rank, init_distributed, job_dist


def job_problem(find: Callable[[], str | None]) -> str | None:
    """What is wrong with the job before any work starts, the same on every rank: what each
    rank finds (find(), run once the ranks have agreed on the job's environment), gathered,
    or a launch that MPI would split; None if nothing is. A process started alone needs
    no MPI for it."""
    if alone():
        return find()
    try:
        dist = init_distributed()
    except JobError as exc:
        return find() or str(exc)  # each process is alone: only what it finds itself is known
    found = dist.allgather(find())
    problems: dict[str, list[int]] = {}
    for rank, problem in enumerate(found):
        if problem is not None:
            problems.setdefault(problem, []).append(rank)
    if not problems:
        return None
    if len(problems) == 1 and len(next(iter(problems.values()))) == dist.world:
        return next(iter(problems))
    return "; ".join(f"{ranks_named(ranks)}: {problem}" for problem, ranks in problems.items())


def leave_together() -> None:
    """Called on every rank before all leave for a reason rank 0 has said: the ranks wait for
    one another (a launcher that ends the job when one rank leaves, as mpirun does, would
    otherwise end rank 0 before its message is out)."""
    if alone():
        return
    try:
        init_distributed().sync()
    except (JobError, PeerTimeout):
        pass


def run_guarded(main: Callable[[], int]) -> int:
    """Runs main(); if it raises, prints the rank's error and aborts every rank of the job."""
    try:
        code = main()
        dist = job_dist()
        if dist is not None:
            dist.sync()  # MPI's finalisation would wait without bound for a stuck peer
        return code
    except KeyboardInterrupt:
        return end_job(130)
    except SystemExit:
        raise
    except JobError as exc:
        # Every process finds the same problem: one of them says it.
        if env_rank() == 0:
            sys.stderr.write(f"star_engine: {exc}\n")
        leave_together()
        return 2
    except PeerTimeout as exc:
        if exc.speaker:
            sys.stderr.write(f"star_engine: rank {env_rank()}: {exc}\n")
        else:
            time.sleep(3.0)  # the speaker's message first
        # At once: an orderly exit would wait for the peer, or for GPU work that never ends.
        return end_job(1, force=True)
    except BaseException as exc:  # noqa: BLE001 - any failure must take the job down
        rank = env_rank()
        # Bad input (ValueError, OSError) gets one line; anything else is a bug: show where.
        expected = isinstance(exc, (ValueError, OSError))
        detail = "" if expected and not os.environ.get("STAR_ENGINE_TRACEBACK") else traceback.format_exc()
        sys.stderr.write(f"{detail}star_engine: rank {rank}: {type(exc).__name__}: {exc}\n")
        # Still inside the handler: the exception holds main's frames, so its communicators
        # are not yet destroyed. A clean NCCL shutdown waits for every rank, which a stuck
        # peer never gives; the job must be aborted first.
        return end_job(1)


def end_job(code: int, force: bool = False) -> int:
    """Ends every rank of the job with `code` (this process alone if it is alone); with
    force, also from a thread other than the main one, at once."""
    sys.stderr.flush()
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    if force:
        os._exit(code)
    return code
