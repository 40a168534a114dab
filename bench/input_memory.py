"""Rank 0's peak memory against the size of `run`'s input, every request answered already or
refused (star_engine/measure/input_memory.py says how). With --baseline COMMIT the same
runs use that commit's tree (git archive, with this tree's built extension), for comparison.

  PYTHONPATH=$PWD python bench/input_memory.py --sizes 20M,2G --baseline b6efa28

The generated inputs go to --workdir (default: a temporary directory) and are deleted
afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from star_engine.json_file import write_json
from star_engine.measure.input_memory import (CONTEXT_CHARS, MAX_TOKENS, QUESTIONS, SCENARIOS, growth, measure_run,
                                              write_requests)
from star_engine.measure.results import environment
from star_engine.measure.text_table import text_table

from results_io import RESULTS

ROOT = Path(__file__).resolve().parent.parent


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20M,2G", help="input sizes, bytes (K, M, G: powers of 1000)")
    parser.add_argument("--baseline", metavar="COMMIT", help="also measure the tree of this commit")
    parser.add_argument("--workdir", type=Path, help="where the inputs are generated (default: a temporary one)")
    parser.add_argument("--output", default="input_memory", help="results name under bench/results/")
    args = parser.parse_args()
    measured = environment(1, torch.device("cpu"), ["python", "bench/input_memory.py"])
    workdir = Path(tempfile.mkdtemp(prefix="input_memory-", dir=args.workdir))
    try:
        trees = {measured.get("commit", "this tree"): ROOT}
        if args.baseline:
            trees[args.baseline] = baseline_tree(args.baseline, workdir)
        rows = []
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            requests = workdir / f"requests-{size}.jsonl"
            ids = write_requests(requests, size)
            for commit, tree in trees.items():
                for scenario in SCENARIOS:
                    row = {"commit": commit, "scenario": scenario, "input_bytes": requests.stat().st_size,
                           "requests": len(ids), **measure_run(tree, requests, ids, scenario, workdir)}
                    row["peak_rss_mib"] = round(row["peak_rss_bytes"] / 2**20, 1)
                    print(text_table([row], ["commit", "scenario", "input_bytes", "requests", "peak_rss_mib",
                                             "records_written"]), flush=True)
                    rows.append(row)
            requests.unlink()
    except RuntimeError as exc:  # a run that failed: its command and its stderr
        raise SystemExit(str(exc)) from None
    finally:
        shutil.rmtree(workdir)
    grew = growth(rows)
    print()
    print(text_table(grew, ["commit", "scenario", "smallest_input_bytes", "largest_input_bytes",
                            "peak_rss_growth_mib"]))
    path = RESULTS / f"{args.output}.json"
    write_json(path, {**measured, "model": "tiny", "max_tokens": MAX_TOKENS, "context_chars": CONTEXT_CHARS,
                      "questions_per_context": QUESTIONS, "rows": rows, "growth": grew})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
