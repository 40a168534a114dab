"""What every benchmark shares: the JSON of measured rows with where and how they were
measured, and the table they print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import star_engine.measure.results

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    from mpi4py import MPI  # every benchmark has initialised it (init_distributed)

    ranks = MPI.COMM_WORLD.Get_size()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {**star_engine.measure.results.environment(ranks, device, ["python", sys.argv[0]]),
            "gpus": torch.cuda.device_count()}


def save(name: str, rows: list[dict], **extra) -> Path:
    """Writes bench/results/<name>.json and returns its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**environment(), **extra, "rows": rows}, indent=1) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain table, nccl-tests style: one header line, one line per row."""
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)
