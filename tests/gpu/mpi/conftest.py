from tests.mpi.conftest import comm, dist, pytest_runtest_logreport, tiny_checkpoint  # noqa: F401
