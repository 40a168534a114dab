"""Rank 0's peak memory against the size of `run`'s input: JSONL files of the same kind (long
documents, several questions each), large and small, read by `python -m star_engine run` on
one rank with the `tiny` preset, in two ways that answer nothing:

  answered  every id is in the output already: the input is read, every request skipped
  refused   every request is longer than --max-tokens: each is read, tokenized and refused

The figure is the process's peak resident memory as the kernel counts it (wait4's
ru_maxrss).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIOS = ("answered", "refused")
CONTEXT_CHARS = 512_000  # about 128K tokens of English text
QUESTIONS = 4  # per document
MAX_TOKENS = 4096  # what the refused requests exceed


def write_requests(path: Path, size_bytes: int, context_chars: int = CONTEXT_CHARS,
                   questions: int = QUESTIONS) -> list[str]:
    """A JSONL file of at least `size_bytes`: documents of `context_chars` characters of
    words, each asked `questions` questions (one line each, the document repeated); its ids."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    text = " ".join(rng.choice(words) for _ in range(2 * context_chars // 5))
    ids, written, document = [], 0, 0
    with path.open("w") as f:
        while written < size_bytes:
            start = (document * 7919) % (len(text) - context_chars)
            context = f"Document {document}. {text[start:start + context_chars]}"
            for q in range(questions):
                rid = f"doc{document}-q{q}"
                line = json.dumps({"id": rid, "context": context,
                                   "query": f"Question {q}: what does document {document} say?"}) + "\n"
                f.write(line)
                written += len(line)
                ids.append(rid)
            document += 1
    return ids


def write_answers(path: Path, ids: list[str]) -> None:
    """A results file that answers every id."""
    with path.open("w") as f:
        for rid in ids:
            f.write(json.dumps({"id": rid, "output": "an answer", "output_tokens": 2, "context_tokens": 128000,
                                "query_tokens": 16, "metrics": {}, "error": None}) + "\n")


def peak_rss_bytes(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, int, str]:
    """Runs cmd to its end: (exit code, peak resident bytes of the process, its stderr)."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        return process.returncode, usage.ru_maxrss * 1024, stderr.read()


def measure_run(tree: Path, requests: Path, ids: list[str], scenario: str, workdir: Path) -> dict:
    """One run of `run` from the source tree `tree` on `requests`: its peak memory and what
    it wrote."""
    out = workdir / f"out-{scenario}.jsonl"
    out.unlink(missing_ok=True)
    if scenario == "answered":
        write_answers(out, ids)
    before = out.stat().st_size if out.exists() else 0
    cmd = [sys.executable, "-m", "star_engine", "run", "--input", str(requests), "--output", str(out),
           "--model", "tiny", "--max-tokens", str(MAX_TOKENS)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    code, peak, stderr = peak_rss_bytes(cmd, tree, env)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} (in {tree}) exited {code}:\n{stderr}")
    written = out.read_bytes()[before:].splitlines()
    refused = sum('"error": null' not in line.decode() for line in written)
    out.unlink()
    return {"peak_rss_bytes": peak, "records_written": len(written), "refused": refused,
            "summary": stderr.strip().splitlines()[-1]}


def growth(rows: list[dict]) -> list[dict]:
    """Per tree (its commit) and scenario: how much the peak grew from the smallest input to
    the largest."""
    out = []
    for commit in dict.fromkeys(r["commit"] for r in rows):
        for scenario in SCENARIOS:
            peaks = sorted((r["input_bytes"], r["peak_rss_bytes"]) for r in rows
                           if r["commit"] == commit and r["scenario"] == scenario)
            out.append({"commit": commit, "scenario": scenario, "smallest_input_bytes": peaks[0][0],
                        "largest_input_bytes": peaks[-1][0],
                        "peak_rss_growth_mib": round((peaks[-1][1] - peaks[0][1]) / 2**20, 1)})
    return out
