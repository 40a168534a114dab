"""Process model: one MPI rank per GPU (or per CPU slot), under mpirun, srun or alone.

Rank, world size and node-local rank come from MPI (mpi4py), so the same program runs
under `mpirun -np N`, `srun --mpi=pmix`, or alone (launcher.py). A launch that MPI did not
join into one job (srun without an MPI plugin starts N jobs of one rank each) is refused
before anything is written. Every wait on a peer is bounded: a rank that stops answering
ends the job with its name (control.py). Each rank takes a GPU of its own (devices.py); a
stop signal ends the job between requests (stopping.py); an exception on any rank ends the
whole job promptly with that rank's message (ending.py).
"""
