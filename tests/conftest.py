import os

# tests/mpi only make sense on the ranks of an mpirun job (tests/test_distributed.py).
collect_ignore = [] if os.environ.get("STAR_ENGINE_MPI_TESTS") else ["mpi"]
