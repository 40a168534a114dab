"""What the scripts of bench/ share: their results go to bench/results/, the project's record,
each with where and how it was measured."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from star_engine.json_file import write_json
from star_engine.measure.results import environment as measured_environment

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    # A benchmark has initialised MPI (init_distributed); a script that reads other results
    # starts no MPI job, and importing mpi4py there would start one: it is one process.
    mpi = sys.modules.get("mpi4py.MPI")
    ranks = mpi.COMM_WORLD.Get_size() if mpi is not None else 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {**measured_environment(ranks, device, ["python", sys.argv[0]]), "gpus": torch.cuda.device_count()}


def save(name: str, rows: list[dict], **extra) -> Path:
    """Writes bench/results/<name>.json and returns its path."""
    path = RESULTS / f"{name}.json"
    write_json(path, {**environment(), **extra, "rows": rows})
    return path
