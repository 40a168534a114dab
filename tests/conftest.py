import os

import torch

# tests/mpi and tests/gpu/mpi only make sense on the ranks of an mpirun job (see
# test_distributed.py beside each); tests/gpu needs a GPU.
collect_ignore = []
if not os.environ.get("STAR_ENGINE_MPI_TESTS"):
    collect_ignore += ["mpi", "gpu/mpi"]
if not torch.cuda.is_available():
    collect_ignore += ["gpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "alone: measures how fast this machine is, so it runs with no other test "
                                       "beside it (`make test` runs the others two at a time, then these)")
