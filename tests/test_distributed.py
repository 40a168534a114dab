"""The multi-rank suite (tests/mpi) under mpirun with 1, 2, 3, 4 and 8 ranks, and how a job
ends when one of its ranks fails or stops answering."""

from __future__ import annotations

import sys
import time

import pytest

from tests.launcher import mpirun, run


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_multi_rank_suite(ranks):
    result = run([*mpirun(ranks), sys.executable, "-m", "pytest", "tests/mpi", "-q", "--color=no", "-p", "no:cacheprovider"],
                 timeout=900, env={"STAR_ENGINE_MPI_TESTS": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert " passed" in result.stdout


FAILING_RANK = """
from star_engine.launch.launcher import init_distributed
from star_engine.launch.ending import run_guarded
def main():
    dist = init_distributed()
    if dist.rank == 1:
        raise RuntimeError("disk on fire")
    dist.sync()  # the others wait for rank 1, which never comes
    return 0
raise SystemExit(run_guarded(main))
"""


def test_an_error_on_one_rank_ends_the_whole_job_with_its_message():
    start = time.monotonic()
    result = run([*mpirun(3), sys.executable, "-c", FAILING_RANK], timeout=120)
    assert result.returncode != 0
    assert "rank 1: RuntimeError: disk on fire" in result.stderr
    assert time.monotonic() - start < 60


STOPPED_RANK = """
import os, signal, sys
import torch
from star_engine.comm import MpiCommunicator
from star_engine.launch.launcher import init_distributed
from star_engine.launch.ending import run_guarded
def main():
    dist = init_distributed()
    comm = MpiCommunicator(dist)
    dist.sync()
    if dist.rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, but answers nothing from here on
    if sys.argv[1] == "control":
        dist.sync()
    else:
        comm.gather_merge(torch.zeros(4, 8), torch.zeros(4))
    return 0
raise SystemExit(run_guarded(main))
"""


@pytest.mark.parametrize("plane,operation", [("control", "a barrier"), ("data", "gather_merge")])
def test_a_stopped_rank_ends_the_job_after_the_timeout_with_its_name(plane, operation):
    start = time.monotonic()
    result = run([*mpirun(3), sys.executable, "-c", STOPPED_RANK, plane], timeout=120,
                 env={"STAR_ENGINE_MPI_TIMEOUT": "3"})
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    message = f"no progress for 3 s in {operation}: rank 2 did not answer"
    assert result.stderr.count(message) == 1, result.stderr  # one rank speaks for those still answering
    assert elapsed < 60
