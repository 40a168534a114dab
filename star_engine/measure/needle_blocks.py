"""Needle-task answers by the star block that holds the needle: from evaluation results,
regenerating their samples (they follow from task, length and seed) to find where each
expected value's needle lies, how often each method's output holds the value per block
and, paired with dense on the same sample, how many values star lost and gained. Block 0
is encoded exactly in phase 1; a later block sees only the anchor and itself.

Each star method is split by its own block count; values count where dense answered the
same sample. niah_single_2 counts only where the evaluation names the Python it ran on and
it is this one: its prose comes from the standard library, so another Python may have
placed its needle elsewhere.
"""

from __future__ import annotations

import platform
import re

from ..attention.star import block_tokens
from .tasks import PYTHON_DEPENDENT, TASKS, make_sample, score

NEEDLE_TASKS = tuple(t for t in TASKS if t.startswith("niah"))


def answer_positions(task_name: str, tokenizer, length: int, seed: int, answers: list[str]) -> tuple[list[int], int]:
    """Token index in the context of the needle of each answer, and the context's length."""
    sample = make_sample(task_name, tokenizer, length, seed)
    if list(sample.answers) != answers:
        raise ValueError(f"{task_name} sample {seed} at {length}: regenerated answers {sample.answers} "
                         f"differ from the evaluation's {answers}")
    starts = [next(s for n, s in zip(sample.needles, sample.needle_starts) if n.endswith(f": {a}.")) for a in answers]
    return starts, len(sample.context_ids)


def star_blocks(method: str) -> int | None:
    """The block count of a star method's name (StrategySpec.label: "star 4b a=1/4")."""
    match = re.match(r"star (\d+)b", method)
    return int(match[1]) if match else None


def values_by_block(results: list[dict], tokenizer) -> list[dict]:
    """Per (length, star method, block holding the needle): the expected values, how often
    star and dense found them, and how many star lost and gained against dense."""
    # (sample, value, its needle's token index, context length) -> method -> value found
    found: dict[tuple, dict[str, bool]] = {}
    positions: dict[tuple, tuple[list[int], int]] = {}  # every method answered the same sample
    for result in results:
        same_python = result.get("python") == platform.python_version()
        tasks = [t for t in NEEDLE_TASKS if t not in PYTHON_DEPENDENT or same_python]
        for r in result["rows"]:
            if r["task"] not in tasks:
                continue
            key = (r["task"], r["length"], r["sample"])  # a row's sample is its seed
            if key not in positions:
                positions[key] = answer_positions(r["task"], tokenizer, r["length"], r["sample"], r["answers"])
            starts, n = positions[key]
            for answer, start in zip(r["answers"], starts):
                found.setdefault((key, answer, start, n), {})[r["method"]] = score(r["output"], (answer,)) == 1
    # (length, method, block) -> [values, star found, dense found, lost, gained]
    cells: dict[tuple, list[int]] = {}
    for (key, _, start, n), by_method in found.items():
        if "dense" not in by_method:
            continue
        for method, hit in by_method.items():
            blocks = star_blocks(method)
            if blocks is None:
                continue
            cell = cells.setdefault((key[1], method, start // block_tokens(n, None, blocks)), [0] * 5)
            dense = by_method["dense"]
            for i, add in enumerate((1, hit, dense, dense and not hit, hit and not dense)):
                cell[i] += add
    return [{"length": length, "method": method, "needle_block": block, "values": n, "found": round(hit / n, 3),
             "dense_found": round(dense / n, 3), "lost": lost, "gained": gained}
            for (length, method, block), (n, hit, dense, lost, gained) in sorted(cells.items())]


def last_block_against_the_others(rows: list[dict]) -> list[dict]:
    """Every length together: values lost and gained in the last block and in the others."""
    sums: dict[tuple, list[int]] = {}
    for r in rows:
        last = r["needle_block"] == star_blocks(r["method"]) - 1
        cell = sums.setdefault((r["method"], "last block" if last else "other blocks"), [0, 0, 0])
        for i, k in enumerate(("values", "lost", "gained")):
            cell[i] += r[k]
    return [{"method": method, "needles_in": where, "values": n, "lost": lost, "gained": gained,
             "net": gained - lost} for (method, where), (n, lost, gained) in sorted(sums.items())]
