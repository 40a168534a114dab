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
