"""Tests here run on every rank of `mpirun -np N python -m pytest tests/mpi` (see
tests/test_distributed.py). A failure on any rank aborts the job at once, so that no rank
waits forever in a collective that a failed rank will never join."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from star_engine.comm import MpiCommunicator
from star_engine.launch.control import Dist
from star_engine.launch.launcher import init_distributed
from tests.reference import make_tiny_checkpoint


def pytest_runtest_logreport(report):
    if report.failed:
        from mpi4py import MPI

        sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] FAILED {report.nodeid}\n{report.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


@pytest.fixture(scope="session")
def dist() -> Dist:
    return init_distributed()


@pytest.fixture(scope="session")
def comm(dist: Dist) -> MpiCommunicator:
    return MpiCommunicator(dist)


@pytest.fixture(scope="session")
def tiny_checkpoint(dist: Dist) -> Path:
    """One random tiny Llama checkpoint, written by rank 0, read by all."""
    path = None
    if dist.rank == 0:
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="star_engine_test_")))
    return dist.bcast(path, root=0)
