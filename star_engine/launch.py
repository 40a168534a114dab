"""Process model: one MPI rank per GPU (or per CPU slot), under mpirun, srun or alone.

Rank, world size and node-local rank come from MPI (mpi4py), so the same program runs
under `mpirun -np N`, `srun --mpi=pmix`, or alone. A launch that MPI did not join into one
job (srun without an MPI plugin starts N jobs of one rank each) is refused before anything
is written. Every wait on a peer is bounded: a rank that stops answering ends the job with
its name. An exception on any rank ends the whole job promptly with that rank's message.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .environment import agree, job_setting

if TYPE_CHECKING:
    import torch

# Seconds a rank waits for its peers in one MPI operation before it ends the job.
DEFAULT_MPI_TIMEOUT_S = 600.0
# Seconds a rank waits for GPU work that holds a collective (NCCL, or the peer-memory gather).
DEFAULT_NCCL_TIMEOUT_S = 600.0
# Seconds a stop signal leaves the request in hand before the job is abandoned.
DEFAULT_STOP_GRACE_S = 20.0
# Seconds the ranks that ran out of patience give the others to answer "are you there?".
PING_WINDOW_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PING, _PONG = 1, 2  # message tags of "are you there?" and its answer


class JobError(ValueError):
    """A problem every rank finds the same (how the processes were started, what the job
    asks for), before anything is computed: one rank says it."""


class PeerTimeout(RuntimeError):
    """A peer did not take part in an MPI operation within the timeout."""

    def __init__(self, message: str, speaker: bool) -> None:
        super().__init__(message)
        self.speaker = speaker  # the one rank of those still answering that reports it


class Place:
    """A rank's place in a job of `world` ranks, what a strategy's layout depends on. The
    last rank holds the query, appends generated tokens and decides them."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def query_rank(self) -> int:
        return self.world - 1

    @property
    def is_query_rank(self) -> bool:
        return self.rank == self.query_rank


class Dist(Place):
    """This process's place in the job, and the control plane between ranks (small Python
    objects over MPI: requests, metrics, barriers), every wait of which is bounded."""

    def __init__(self, mpi: Any, local_rank: int, local_world: int, node_leader: int, timeout_s: float) -> None:
        """node_leader: the lowest rank of this rank's node, which names the node."""
        super().__init__(mpi.Get_rank(), mpi.Get_size())
        self.mpi = mpi  # mpi4py.MPI.Comm of all ranks
        self.local_rank, self.local_world = local_rank, local_world  # among the ranks of this node
        self.timeout_s = timeout_s
        self._pings = mpi.Dup()  # where waiting ranks ask each other whether they are alive
        self._pongs: list[Any] = []
        leaders = self.allgather(node_leader)
        self.node_of = tuple(sorted(set(leaders)).index(leader) for leader in leaders)  # by rank: 0, 1, ...
        self.nodes = len(set(leaders))

    def group(self, color: int, key: int) -> "Dist":
        """The ranks that pass the same color, numbered by key: a Dist of their own (every
        rank of this one must call it)."""
        sub = self.mpi.Split(color, key)
        nodes = sub.allgather(self.node_of[self.rank])
        mine = [r for r, node in enumerate(nodes) if node == nodes[sub.Get_rank()]]
        return Dist(sub, mine.index(sub.Get_rank()), len(mine), self.node_of[self.rank], self.timeout_s)

    def sync(self) -> None:
        """A barrier."""
        self.wait(self.mpi.Ibarrier(), "a barrier")

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """root's obj (any picklable object) on every rank."""
        from mpi4py import MPI

        data = pickle.dumps(obj) if self.rank == root else b""
        size = bytearray(len(data).to_bytes(8, "little"))
        self.wait(self.mpi.Ibcast([size, MPI.BYTE], root=root), "a broadcast")
        buf = bytearray(data) if self.rank == root else bytearray(int.from_bytes(size, "little"))
        self.wait(self.mpi.Ibcast([buf, MPI.BYTE], root=root), "a broadcast")
        return obj if self.rank == root else pickle.loads(buf)

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        from mpi4py import MPI

        data = pickle.dumps(obj)
        sizes = bytearray(8 * self.world)
        self.wait(self.mpi.Iallgather([len(data).to_bytes(8, "little"), MPI.BYTE], [sizes, MPI.BYTE]),
                  "an all-gather")
        counts = [int.from_bytes(sizes[8 * r: 8 * r + 8], "little") for r in range(self.world)]
        displacements = [sum(counts[:r]) for r in range(self.world)]
        gathered = bytearray(sum(counts))
        self.wait(self.mpi.Iallgatherv([data, MPI.BYTE], [gathered, (counts, displacements), MPI.BYTE]),
                  "an all-gather")
        return [pickle.loads(gathered[d: d + c]) for d, c in zip(displacements, counts)]

    def any(self, flag: bool) -> bool:
        """Whether flag is true on some rank."""
        return any(self.allgather(bool(flag)))

    def wait(self, request: Any, what: str) -> None:
        """Completes an MPI request; if the peers have not completed it within timeout_s,
        finds out which of them no longer answer and raises PeerTimeout naming them.

        Polls briefly, then sleeps between polls: MPI's blocking calls spin, and with more
        ranks than cores (CI, laptops) the waiting ranks would starve the one that computes.
        While it waits, a rank answers the others' "are you there?".
        """
        deadline = time.perf_counter() + 2e-4
        while not request.Test():
            if time.perf_counter() > deadline:
                break
        else:
            return
        deadline = time.monotonic() + self.timeout_s
        pause = 5e-5
        while not request.Test():
            self._answer_pings()
            if time.monotonic() > deadline:
                self._no_progress(what)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _answer_pings(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while self._pings.Iprobe(MPI.ANY_SOURCE, _PING, status):
            source = status.Get_source()
            self._pings.Recv([bytearray(1), MPI.BYTE], source, _PING)
            self._pongs.append(self._pings.Isend([b"!", MPI.BYTE], source, _PONG))
        self._pongs = [request for request in self._pongs if not request.Test()]

    def _no_progress(self, what: str) -> None:
        raise self.unresponsive(f"no progress for {self.timeout_s:g} s in {what}", "STAR_ENGINE_MPI_TIMEOUT")

    def unresponsive(self, waited: str, timeout_var: str) -> PeerTimeout:
        """A PeerTimeout for a wait that ran out (`waited` says which): asks every other rank
        whether it is there (those waiting answer) and names those that did not."""
        from mpi4py import MPI

        others = [r for r in range(self.world) if r != self.rank]
        replies = {r: bytearray(1) for r in others}
        receiving = {r: self._pings.Irecv([replies[r], MPI.BYTE], r, _PONG) for r in others}
        asking = [self._pings.Isend([b"?", MPI.BYTE], r, _PING) for r in others]
        end = time.monotonic() + PING_WINDOW_S
        while time.monotonic() < end and not all(request.Test() for request in [*receiving.values(), *asking]):
            self._answer_pings()
            time.sleep(1e-3)
        silent = [r for r, request in receiving.items() if not request.Test()]
        answering = sorted({self.rank, *(r for r in others if r not in silent)})
        if silent:
            names = ", ".join(map(str, silent))
            message = (f"{waited}: rank{'s' if len(silent) > 1 else ''} {names} did not answer (stopped, "
                       f"hung, dead, or busy longer than {timeout_var})")
        elif others:
            message = f"{waited}, while every rank answers: the ranks wait in different operations"
        else:
            message = waited
        return PeerTimeout(message, speaker=answering[0] == self.rank)


# --- Launch ------------------------------------------------------------------------------

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
    from mpi4py import MPI

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


def seconds_from_env(var: str, default: float) -> float:
    """A number of seconds > 0 from the environment variable `var` (the job's value, as the
    ranks agreed it), else `default`; JobError naming the variable if it is not one."""
    text = job_setting(var)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise JobError(f"{var}={text!r}: expected a number of seconds > 0")
    return value


# --- Devices -----------------------------------------------------------------------------

def select_device(kind: str, dist: Dist) -> torch.device:
    """`cuda`: this rank's GPU, as the launcher made them visible: the one GPU a task sees
    (srun --gpus-per-task=1, --gpu-bind), else the node's GPUs dealt out by node-local rank.
    Two ranks never share a GPU unless STAR_ENGINE_SHARE_GPUS=1. `cpu`: the node's cores
    shared out."""
    import torch  # here, so that the command line parses its arguments before PyTorch loads

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch sees no GPU")
        device = torch.device("cuda", gpu_index(torch.cuda.device_count(), dist.local_rank, dist.local_world))
        if len(os.sched_getaffinity(0)) == 1:
            # Bound to one core (mpirun binds each of 2 ranks to one by default). NCCL's network
            # transport moves every message with threads of its own, which inherit this mask and
            # would share that core: about 6 ms a collective on H200s over sockets, 50 us with
            # the node's cores (as far as the job's cgroup allows).
            try:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
            except OSError:
                pass
        torch.cuda.set_device(device)
        check_gpus_not_shared(dist, gpu_id(device))
        return device
    if kind != "cpu":
        raise ValueError(f"unknown device {kind!r}: expected cpu or cuda")
    if "OMP_NUM_THREADS" not in os.environ:  # ranks of one node would otherwise oversubscribe it
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    return torch.device("cpu")


def gpu_index(visible: int, local_rank: int, local_world: int) -> int:
    """Which of the GPUs this process sees it uses."""
    if visible == 1:
        return 0  # the launcher bound one GPU to this task
    if visible >= local_world:
        return local_rank
    raise ValueError(f"{local_world} ranks on this node see {visible} GPUs each: launch one rank per GPU "
                     "(srun --ntasks-per-node=<GPUs per node>, or --gpus-per-task=1)")


def gpu_id(device: torch.device) -> str:
    """The physical GPU behind `device`: its node and UUID (or, lacking one, its index
    before CUDA_VISIBLE_DEVICES renumbered them)."""
    import socket

    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        uuid = visible[device.index] if device.index < len(visible) and visible[device.index] else device.index
    return f"{socket.gethostname()}:{uuid}"


def check_gpus_not_shared(dist: Dist, gpu: str) -> None:
    """Raises, on every rank, if two ranks would use one GPU and sharing was not asked for."""
    gpus = dist.allgather(gpu)
    if job_setting("STAR_ENGINE_SHARE_GPUS") == "1":
        return
    owners: dict[str, list[int]] = {}
    for rank, name in enumerate(gpus):
        owners.setdefault(name, []).append(rank)
    shared = [ranks for ranks in owners.values() if len(ranks) > 1]
    if shared:
        ranks = shared[0]
        raise ValueError(f"ranks {', '.join(map(str, ranks))} would share one GPU ({gpus[ranks[0]]}): give each "
                         "rank a GPU of its own (srun --gpus-per-task=1, or as many ranks per node as GPUs), "
                         "or set STAR_ENGINE_SHARE_GPUS=1 if that is meant")


# --- Stopping ----------------------------------------------------------------------------

class GracefulStop:
    """Inside `with GracefulStop() as stop:`, SIGTERM (Slurm's notice before it kills a job:
    time limit, preemption, scancel) or SIGUSR1 (which mpirun passes on to the ranks) asks
    the job to stop: the caller sees `stop.requested` and ends at its next boundary. If it
    has not within `grace_s` seconds, the job is abandoned, with nothing half written (hold
    `writing` while writing a result); what `before_abandoning` was given runs first."""

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self, grace_s: float | None = None) -> None:
        self.grace_s = grace_s if grace_s is not None else seconds_from_env("STAR_ENGINE_STOP_GRACE",
                                                                             DEFAULT_STOP_GRACE_S)
        self.signal_name: str | None = None
        self.writing = threading.RLock()
        self._timer: threading.Timer | None = None
        self._before_abandoning: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._timer is not None:
            self._timer.cancel()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def before_abandoning(self, note: Callable[[], None]) -> None:
        """note() runs if the job is abandoned, from another thread, holding `writing`."""
        self._before_abandoning = note

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        self._timer = threading.Timer(self.grace_s, self._abandon)
        self._timer.daemon = True
        self._timer.start()

    def _abandon(self) -> None:
        rank = env_rank()
        if rank != 0:
            time.sleep(2.0)  # rank 0 speaks for the job, unless it is gone
        with self.writing:
            if self._before_abandoning is not None:
                try:
                    self._before_abandoning()
                except Exception as exc:  # noqa: BLE001 - the job ends all the same
                    sys.stderr.write(f"star_engine: rank {rank}: {type(exc).__name__}: {exc}\n")
            sys.stderr.write(f"star_engine: rank {rank}: {self.signal_name}: the work in hand did not finish "
                             f"within {self.grace_s:g} s (STAR_ENGINE_STOP_GRACE); abandoned, a rerun does it\n")
            _end_job(self.EXIT_CODE, force=True)


# --- Ending a job ------------------------------------------------------------------------

def job_problem(find: Callable[[], str | None]) -> str | None:
    """What is wrong with the job before any work starts, the same on every rank: what each
    rank finds (find(), run once the ranks have agreed on the job's environment), gathered,
    or a launch that MPI would split; None if nothing is."""
    try:
        dist = init_distributed()
    except JobError as exc:
        return find() or str(exc)  # each process is alone: only what it finds itself is known
    found = dist.allgather(find())
    problems: dict[str, list[int]] = {}
    for rank, problem in enumerate(found):
        if problem is not None:
            problems.setdefault(problem, []).append(rank)
    if not problems:
        return None
    if len(problems) == 1 and len(next(iter(problems.values()))) == dist.world:
        return next(iter(problems))
    return "; ".join(f"{_ranks(ranks)}: {problem}" for problem, ranks in problems.items())


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def leave_together() -> None:
    """Called on every rank before all leave for a reason rank 0 has said: the ranks wait for
    one another (a launcher that ends the job when one rank leaves, as mpirun does, would
    otherwise end rank 0 before its message is out)."""
    try:
        init_distributed().sync()
    except (JobError, PeerTimeout):
        pass


def run_guarded(main: Callable[[], int]) -> int:
    """Runs main(); if it raises, prints the rank's error and aborts every rank of the job."""
    try:
        code = main()
        if _job_dist is not None:
            _job_dist.sync()  # MPI's finalisation would wait without bound for a stuck peer
        return code
    except KeyboardInterrupt:
        return _end_job(130)
    except SystemExit:
        raise
    except JobError as exc:
        # Every process finds the same problem: one of them says it.
        if env_rank() == 0:
            sys.stderr.write(f"star_engine: {exc}\n")
        leave_together()
        return 2
    except PeerTimeout as exc:
        if exc.speaker:
            sys.stderr.write(f"star_engine: rank {env_rank()}: {exc}\n")
        else:
            time.sleep(3.0)  # the speaker's message first
        # At once: an orderly exit would wait for the peer, or for GPU work that never ends.
        return _end_job(1, force=True)
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


def _end_job(code: int, force: bool = False) -> int:
    """Ends every rank of the job with `code` (this process alone if it is alone); with
    force, also from a thread other than the main one, at once."""
    sys.stderr.flush()
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    if force:
        os._exit(code)
    return code


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
