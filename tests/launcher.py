"""How the tests start jobs of several ranks: the mpirun beside this Python (the project's
own Open MPI), oversubscribed, allowed to run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpirun(ranks: int) -> list[str]:
    local = Path(sys.executable).parent / "mpirun"
    exe = str(local) if local.exists() else shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("no mpirun found: run `make test`, which installs Open MPI")
    return [exe, "--oversubscribe", "-np", str(ranks)]


def mpirun_parts(*parts: list[str]) -> list[str]:
    """One mpirun of several parts, each its own ranks and command (["-np", "2", *command]),
    as where ranks start in other directories, environments or at other times."""
    launch = mpirun(1)[:-2]  # without -np: each part says its own
    for i, part in enumerate(parts):
        launch += [":"] * (i > 0) + part
    return launch


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job the tests start: this checkout importable, output unbuffered,
    Open MPI allowed to run as root."""
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kwargs.pop("cwd", ROOT), env=job_env(kwargs.pop("env", None)),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Starts cmd like run() does, without waiting for it."""
    return subprocess.Popen(cmd, cwd=kwargs.pop("cwd", ROOT), env=job_env(kwargs.pop("env", None)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def star_engine(args: list[str], ranks: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m star_engine args`, under mpirun with `ranks` ranks where given."""
    launcher = mpirun(ranks) if ranks else []
    return run([*launcher, sys.executable, "-m", "star_engine", *args], timeout=timeout)
