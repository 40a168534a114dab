"""Writing a JSON file whole or not at all: a job stopped while writing keeps the file it
had (results, calibrations, the note of unfinished requests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """data as indented JSON at path, replacing what was there in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)
