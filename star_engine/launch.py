"""Process model: one MPI rank per GPU (or per CPU slot), under mpirun or srun.

Rank, world size and node-local rank come from MPI (mpi4py), so the same program runs
under `mpirun -np N`, `srun`, or alone. An exception on any rank ends the whole job
promptly with that rank's message: no survivor blocks forever in a collective.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int  # rank among the processes of this node
    local_world: int
    mpi: object  # mpi4py.MPI.Comm of all ranks (control plane: requests, metrics, barriers)

    @property
    def query_rank(self) -> int:
        """The rank that holds the query, appends generated tokens and decides them."""
        return self.world - 1

    @property
    def is_query_rank(self) -> bool:
        return self.rank == self.query_rank

    def sync(self) -> None:
        """A barrier that waits without burning a core (see mpi_wait)."""
        mpi_wait(self.mpi.Ibarrier())


def mpi_wait(request) -> None:
    """Completes an MPI request, polling briefly, then sleeping between polls.

    MPI's blocking calls spin; with more ranks than cores (CI, laptops) the ranks waiting
    for a collective would then starve the one rank that computes.
    """
    deadline = time.perf_counter() + 2e-4
    while not request.Test():
        if time.perf_counter() > deadline:
            break
    pause = 5e-5
    while not request.Test():
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


def init_distributed() -> Dist:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    return Dist(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), world)


def select_device(kind: str, dist: Dist) -> torch.device:
    """`cuda`: this rank's GPU, by node-local rank. `cpu`: the node's cores shared out."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch sees no GPU")
        count = torch.cuda.device_count()
        if dist.local_world > count:
            raise ValueError(f"{dist.local_world} ranks on this node but only {count} GPUs: "
                             "launch one rank per GPU")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    if kind != "cpu":
        raise ValueError(f"unknown device {kind!r}: expected cpu or cuda")
    if "OMP_NUM_THREADS" not in os.environ:  # ranks of one node would otherwise oversubscribe it
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    return torch.device("cpu")


def run_guarded(main: Callable[[], int]) -> int:
    """Runs main(); if it raises, prints the rank's error and aborts every rank of the job."""
    try:
        return main()
    except KeyboardInterrupt:
        return _end_job(130)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must take the job down
        rank = env_rank()
        # Bad input (ValueError, OSError) gets one line; anything else is a bug: show where.
        expected = isinstance(exc, (ValueError, OSError))
        detail = "" if expected and not os.environ.get("STAR_ENGINE_TRACEBACK") else traceback.format_exc()
        sys.stderr.write(f"{detail}star_engine: rank {rank}: {type(exc).__name__}: {exc}\n")
        # Still inside the handler: the exception holds main's frames, so its communicators
        # are not yet destroyed. A clean NCCL shutdown waits for every rank, which a stuck
        # peer never gives; the job must be aborted first.
        return _end_job(1)


def _end_job(code: int) -> int:
    sys.stderr.flush()
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    return code


def env_rank() -> int:
    """This process's rank, also before MPI is initialised (from the launcher's variables)."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
