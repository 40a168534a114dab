"""Rank 0's peak memory against the size of `run`'s input: JSONL files of the same kind (long
documents, several questions each), large and small, read by `python -m star_engine run`
on one rank with the `tiny` preset, in two ways that answer nothing:

  answered  every id is in the output already: the input is read, every request skipped
  refused   every request is longer than --max-tokens: each is read, tokenized and refused

The figure is the process's peak resident memory as the kernel counts it (wait4's
ru_maxrss). With --baseline COMMIT the same runs use that commit's tree (git archive, with
this tree's built extension), for comparison.

  PYTHONPATH=$PWD python bench/input_memory.py --sizes 20M,2G --baseline b6efa28

The generated inputs go to --workdir (default: a temporary directory) and are deleted
afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def measure(tree: Path, requests: Path, ids: list[str], scenario: str, workdir: Path) -> dict:
    """One run of `run` from `tree` on `requests`: its peak memory and what it wrote."""
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
        raise SystemExit(f"{' '.join(cmd)} (in {tree}) exited {code}:\n{stderr}")
    written = out.read_bytes()[before:].splitlines()
    refused = sum('"error": null' not in line.decode() for line in written)
    out.unlink()
    return {"peak_rss_bytes": peak, "records_written": len(written), "refused": refused,
            "summary": stderr.strip().splitlines()[-1]}


def baseline_tree(commit: str, into: Path) -> Path:
    """The tree of `commit`, with this tree's built extension."""
    tree = into / f"tree-{commit}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for built in (ROOT / "star_engine").glob("_C*.so"):
        shutil.copy2(built, tree / "star_engine" / built.name)
    return tree


def parse_size(text: str) -> int:
    """'20M' -> 20,000,000 bytes, '2G' -> 2,000,000,000."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    import torch

    import star_engine.measure.results

    from results_io import RESULTS, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20M,2G", help="input sizes, bytes (K, M, G: powers of 1000)")
    parser.add_argument("--baseline", metavar="COMMIT", help="also measure the tree of this commit")
    parser.add_argument("--workdir", type=Path, help="where the inputs are generated (default: a temporary one)")
    parser.add_argument("--output", default="input_memory", help="results name under bench/results/")
    args = parser.parse_args()
    environment = star_engine.measure.results.environment(1, torch.device("cpu"), ["python", "bench/input_memory.py"])
    workdir = Path(tempfile.mkdtemp(prefix="input_memory-", dir=args.workdir))
    try:
        trees = {environment["commit"]: ROOT}
        if args.baseline:
            trees[args.baseline] = baseline_tree(args.baseline, workdir)
        rows = []
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            requests = workdir / f"requests-{size}.jsonl"
            ids = write_requests(requests, size)
            for commit, tree in trees.items():
                for scenario in SCENARIOS:
                    row = {"commit": commit, "scenario": scenario, "input_bytes": requests.stat().st_size,
                           "requests": len(ids), **measure(tree, requests, ids, scenario, workdir)}
                    row["peak_rss_mib"] = round(row["peak_rss_bytes"] / 2**20, 1)
                    print(table([row], ["commit", "scenario", "input_bytes", "requests", "peak_rss_mib",
                                        "records_written"]), flush=True)
                    rows.append(row)
            requests.unlink()
    finally:
        shutil.rmtree(workdir)
    growth = []
    for commit in trees:
        for scenario in SCENARIOS:
            peaks = sorted((r["input_bytes"], r["peak_rss_bytes"]) for r in rows
                           if r["commit"] == commit and r["scenario"] == scenario)
            growth.append({"commit": commit, "scenario": scenario, "smallest_input_bytes": peaks[0][0],
                           "largest_input_bytes": peaks[-1][0],
                           "peak_rss_growth_mib": round((peaks[-1][1] - peaks[0][1]) / 2**20, 1)})
    print()
    print(table(growth, ["commit", "scenario", "smallest_input_bytes", "largest_input_bytes",
                         "peak_rss_growth_mib"]))
    path = RESULTS / f"{args.output}.json"
    star_engine.measure.results.save(path, {**environment, "model": "tiny", "max_tokens": MAX_TOKENS,
                                    "context_chars": CONTEXT_CHARS, "questions_per_context": QUESTIONS,
                                    "rows": rows, "growth": growth})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
