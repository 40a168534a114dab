"""Needle-task answers by the star block that holds the needle: rereads evaluation results,
regenerates their samples (they follow from task, length and seed) to find where each
expected value's needle lies, and counts, per block, how often each method's output holds
the value and, paired with dense on the same sample, how many values star lost and gained.
Block 0 is encoded exactly in phase 1; a later block sees only the anchor and itself.

  python bench/needle_blocks.py --eval RESULT.json [...] --blocks 4 --name NAME

niah_single_2 counts only where the evaluation names the Python it ran on and it is this
one: its prose comes from the standard library, so another Python may have placed its
needle elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
from pathlib import Path

from results_io import save, table

from star_engine.tasks import TASKS, make_sample, score
from star_engine.tokenizer import load_tokenizer

NEEDLE_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                "niah_multikey_3", "niah_multivalue", "niah_multiquery")


def answer_positions(task_name: str, tokenizer, length: int, seed: int, answers: list[str]) -> tuple[list[int], int]:
    """Token index in the context of the needle of each answer, and the context's length."""
    sample = make_sample(task_name, tokenizer, length, seed)
    if list(sample.answers) != answers:
        raise ValueError(f"{task_name} sample {seed} at {length}: regenerated answers {sample.answers} "
                         f"differ from the evaluation's {answers}")
    task = TASKS[task_name](random.Random(f"{task_name}:{seed}"))  # make_sample's own first draw
    ctx, positions = sample.context_ids, []
    for answer in answers:
        needle = next(n for n in task.needles if n.endswith(f": {answer}."))
        ids = tokenizer.encode(" " + needle)  # as make_sample inserts it
        positions.append(next(i for i in range(len(ctx) - len(ids) + 1) if ctx[i:i + len(ids)] == ids))
    return positions, len(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="evaluation JSON(s)")
    parser.add_argument("--blocks", type=int, default=4, help="star's block count to split by")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer made the samples")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model, ())
    found: dict[tuple, dict[str, bool]] = {}  # (length, sample key, answer, block) -> method -> found
    positions: dict[tuple, tuple[list[int], int]] = {}  # every method answered the same sample
    for path in args.eval:
        result = json.loads(path.read_text())
        tasks = [t for t in NEEDLE_TASKS if t != "niah_single_2" or result.get("python") == platform.python_version()]
        for r in result["rows"]:
            if r["task"] not in tasks:
                continue
            key = (r["task"], r["length"], result["seed"] + r["sample"])
            if key not in positions:
                positions[key] = answer_positions(r["task"], tokenizer, r["length"], key[2], r["answers"])
            starts, n = positions[key]
            for answer, start in zip(r["answers"], starts):
                block = start // math.ceil(n / args.blocks)
                found.setdefault((r["length"], key, answer, block), {})[r["method"]] = score(r["output"], (answer,)) == 1
    cells: dict[tuple, list[int]] = {}  # (length, method, block) -> [values, found, lost, gained]
    for (length, _, _, block), by_method in found.items():
        for method, hit in by_method.items():
            cell = cells.setdefault((length, method, block), [0, 0, 0, 0])
            cell[0] += 1
            cell[1] += hit
            if method != "dense" and "dense" in by_method:
                cell[2] += by_method["dense"] and not hit
                cell[3] += hit and not by_method["dense"]
    rows = [{"length": length, "method": method, "needle_block": block, "values": n, "found": round(hit / n, 3),
             **({"lost": lost, "gained": gained} if method != "dense" else {})}
            for (length, method, block), (n, hit, lost, gained) in sorted(cells.items())]
    print(table(rows, ["length", "method", "needle_block", "values", "found", "lost", "gained"]))
    print("saved", save(args.name, rows, evals=[str(p) for p in args.eval], blocks=args.blocks))


if __name__ == "__main__":
    main()
