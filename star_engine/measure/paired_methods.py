"""Two methods of an evaluation, sample by sample: on how many samples each scores higher,
and the two-sided exact sign test of whether they differ (McNemar's exact test where scores
are 0 or 1), per length and over all. Samples whose prose depends on the Python version
(niah_single_2) pair only within results made by the same Python."""

from __future__ import annotations

import math

from .tasks import PYTHON_DEPENDENT


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact p-value that wins and losses (ties dropped) come from a fair coin."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(results: list[dict], a: str, b: str) -> list[dict]:
    """Per length, then over all: the samples both methods answered and how they compare."""
    scores: dict[tuple, dict[str, float]] = {}
    for result in results:
        for r in result["rows"]:
            if r["method"] in (a, b):
                # Another Python wrote another document for the same seed of these tasks.
                python = result.get("python", "unknown") if r["task"] in PYTHON_DEPENDENT else ""
                scores.setdefault((r["task"], r["length"], r["sample"], python), {})[r["method"]] = r["score"]
    pairs = [(key[1], s[a], s[b]) for key, s in sorted(scores.items()) if a in s and b in s]
    rows = []
    for length in [*sorted({p[0] for p in pairs}), "all"]:
        mine = [(x, y) for n, x, y in pairs if length in (n, "all")]
        wins_a, wins_b = sum(x > y for x, y in mine), sum(y > x for x, y in mine)
        rows.append({"length": length, "samples": len(mine),
                     "mean_a": sum(x for x, _ in mine) / len(mine) if mine else None,
                     "mean_b": sum(y for _, y in mine) / len(mine) if mine else None,
                     "a_higher": wins_a, "b_higher": wins_b,
                     "ties": len(mine) - wins_a - wins_b, "p_value": sign_test(wins_a, wins_b)})
    return rows
