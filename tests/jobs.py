"""Requests and results files of the jobs the tests run, and the flags most of them use."""

from __future__ import annotations

import json
from pathlib import Path

TINY = ["--model", "tiny", "--max-new-tokens", "3"]
# Every request on every host: one group, one stream of requests, star's blocks fixed.
ALL_HOSTS = ("--hosts-per-request", "all")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def good(rid, context_len: int = 120, **extra) -> dict:
    return {"id": rid, "context": "The quick brown fox jumps over the lazy dog. " * (context_len // 45 + 1),
            "query": "What did the fox do?", **extra}
