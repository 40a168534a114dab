"""Where and how a figure was measured (device, ranks, commit, date, the command), as every
results file records it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from ..environment import job_setting
from ..launch.launcher import launcher_command


def environment(ranks: int, device: torch.device, program: list[str]) -> dict:
    """Where and how a result was measured: device, ranks (as MPI counts them), the commit
    where one is known (code_commit), date, the command line (the launcher, `program`, this
    process's arguments). Taken when a run starts, so that the commit names the code that ran."""
    commit = code_commit()
    nccl = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}  # tuning changes results
    # The command shows the variables a user set to tune NCCL or the engine's gather path,
    # not what every run here has.
    tuned = [f"{k}={v}" for k, v in nccl.items() if k not in ("NCCL_NVLS_ENABLE", "NCCL_VERSION")]
    if job_setting("STAR_ENGINE_PEER_GATHER"):
        tuned.append(f"STAR_ENGINE_PEER_GATHER={job_setting('STAR_ENGINE_PEER_GATHER')}")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ranks": ranks,
        **({"commit": commit} if commit else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(tuned + ([launcher_command(ranks)] if ranks > 1 else [])
                            + [shlex.quote(a) for a in [*program, *sys.argv[1:]]]),
        "nccl_env": nccl,
        "torch": torch.__version__,
        "python": platform.python_version(),  # niah_single_2's prose comes from its standard library
        # CPU figures depend on the processor and on how many threads torch ran; NCCL's network
        # transport on how many cores a rank may use (mpirun binds 2 ranks to one core each).
        "cpu": {"model": _cpu_model(), "threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0))},
    }


def code_commit() -> str | None:
    """The commit of the code running: $STAR_ENGINE_COMMIT (a copy of the tree, whose .git, if
    any, need not match its files), else HEAD of the git checkout whose tracked files these
    are; None for an installed package or a copy, where any checkout around it may hold other
    code."""
    if os.environ.get("STAR_ENGINE_COMMIT"):
        return os.environ["STAR_ENGINE_COMMIT"]
    checkout = Path(__file__).resolve().parents[2]  # star_engine/measure/results.py
    try:
        top, head = _git(checkout, "rev-parse", "--show-toplevel", "--short", "HEAD").splitlines()
        if Path(top).resolve() != checkout:  # e.g. a virtual environment inside a checkout
            return None
        _git(checkout, "ls-files", "--error-unmatch", "--", str(Path(__file__).resolve().relative_to(checkout)))
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None  # no git, no checkout, or these files are not its own
    return head


def _git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True).stdout


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()
