"""The environment variables that every rank of a job must read alike: rank 0's values,
handed to the others when the job starts.

A launcher need not give every rank the same environment (mpirun passes none of it to
other nodes unless told to, a node's profile may set its own), and ranks that disagree on
a timeout, on how gather_merge travels or on the calibration that sizes star's blocks
would compute different things, or wait for each other in different operations. So rank
0 decides: `agree` makes its values the job's, and says once which ranks saw others.
Variables that only change what one process prints or where it caches are read by each
process itself.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .launch.control import JobError, ranks_named

if TYPE_CHECKING:
    from .launch.control import Dist

# Seconds a rank waits for GPU work that holds a collective (NCCL, or the peer-memory gather).
DEFAULT_NCCL_TIMEOUT_S = 600.0
# Seconds a stop signal leaves the request in hand before the job is abandoned.
DEFAULT_STOP_GRACE_S = 20.0

JOB_VARIABLES = (
    "STAR_ENGINE_MPI_TIMEOUT",
    "STAR_ENGINE_NCCL_TIMEOUT",
    "STAR_ENGINE_STOP_GRACE",
    "STAR_ENGINE_PEER_GATHER",
    "STAR_ENGINE_SHARE_GPUS",
    "STAR_ENGINE_CALIBRATION",
    "STAR_ENGINE_NO_LOCK",  # every rank checks the output before the job starts
)

_agreed: dict[str, str | None] | None = None  # rank 0's values, once agreed


def job_setting(name: str) -> str | None:
    """The job's value of one of JOB_VARIABLES: rank 0's once the ranks have agreed, this
    process's own before (or when it runs alone)."""
    if name not in JOB_VARIABLES:
        raise KeyError(f"{name} is not a variable the ranks agree on")
    return _agreed[name] if _agreed is not None else os.environ.get(name)


def agree(dist: Dist) -> None:
    """Makes rank 0's values of JOB_VARIABLES every rank's (every rank calls it), and has
    rank 0 say once, per variable, which ranks saw another value. A rank alone has no one
    to disagree with: it goes on reading its own environment."""
    global _agreed
    if dist.world == 1:
        return
    own = {name: os.environ.get(name) for name in JOB_VARIABLES}
    decided = dist.bcast(own if dist.rank == 0 else None, root=0)
    differing = dist.allgather([name for name in JOB_VARIABLES if own[name] != decided[name]])
    _agreed = decided
    if dist.rank != 0:
        return
    for name in JOB_VARIABLES:
        ranks = [rank for rank, names in enumerate(differing) if name in names]
        if ranks:
            value = "unset" if decided[name] is None else f"{decided[name]!r}"
            print(f"star_engine: note: {name} differs on {ranks_named(ranks)}; every rank uses rank 0's ({value})",
                  file=sys.stderr, flush=True)


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
