"""tests/gpu/mpi under mpirun, one rank per GPU, and the multi-rank CPU suite's strategy
tests on GPUs."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.launcher import mpirun, run


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_multi_gpu_suite(ranks):
    if ranks > torch.cuda.device_count():
        pytest.skip(f"needs {ranks} GPUs")
    result = run([*mpirun(ranks), sys.executable, "-m", "pytest", "tests/gpu/mpi", "-q", "--color=no",
                  "-p", "no:cacheprovider"], timeout=600, env={"STAR_ENGINE_MPI_TESTS": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]


SILENT_PEER = """
import time, torch
from star_engine.comm import NcclCommunicator
from star_engine.launch import init_distributed, run_guarded, select_device
def main():
    dist = init_distributed()
    nccl = NcclCommunicator(dist, select_device("cuda", dist))
    if dist.rank == 1:
        time.sleep(120)  # alive, but never joins the collective
    o, lse = torch.zeros(4, 1, 64, device="cuda"), torch.zeros(4, 1, device="cuda")
    nccl.gather_merge(o, lse)
    nccl.synchronize()
    return 0
raise SystemExit(run_guarded(main))
"""


@pytest.mark.parametrize("path,message", [("0", "NCCL: no progress for 10 s"),
                                          ("1", "peer exchange: no word from a peer for 10 s")])
def test_a_stuck_peer_ends_the_job_with_a_clear_message_within_the_timeout(path, message):
    """Through NCCL (its watchdog aborts the communicator) and through the peer-memory
    exchange (its kernel waits for the others until a deadline)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = run([*mpirun(2), sys.executable, "-c", SILENT_PEER], timeout=100,
                 env={"STAR_ENGINE_NCCL_TIMEOUT": "10", "STAR_ENGINE_PEER_GATHER": path})
    assert result.returncode != 0
    assert f"rank 0: RuntimeError: {message}" in result.stderr, result.stderr[-4000:]
