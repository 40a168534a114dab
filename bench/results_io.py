"""What every benchmark writes: measured rows plus where and how they were measured."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    # A copy of the tree without .git (a remote machine) is told its commit by STAR_ENGINE_COMMIT.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip() or os.environ.get("STAR_ENGINE_COMMIT", "unknown")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    ranks = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    launcher = f"mpirun -np {ranks} " if ranks > 1 else ""
    return {
        "device": gpu,
        "gpus": torch.cuda.device_count(),
        "ranks": ranks,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": launcher + " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "torch": torch.__version__,
    }


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
