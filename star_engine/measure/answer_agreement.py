"""How often two evaluation runs of the same samples answer alike: the same score, the same
text, per length and method; e.g. the GPU path (bfloat16) against the CPU path (float32).
Tasks whose samples depend on the Python version (niah_single_2) count only where both runs
name the same Python."""

from __future__ import annotations

from .tasks import PYTHON_DEPENDENT


def agreement(a_results: list[dict], b_results: list[dict]) -> list[dict]:
    """Per (length, method), then over all: answers both runs made to the same sample, and
    how many of them have the same score and the same text."""
    a, b = answers_by_sample(a_results), answers_by_sample(b_results)
    cells: dict[tuple, list[int]] = {}
    for key in sorted(a.keys() & b.keys()):
        same_python = a[key]["python"] is not None and a[key]["python"] == b[key]["python"]
        if key[0] in PYTHON_DEPENDENT and not same_python:
            continue  # not known to be the same document
        cell = cells.setdefault((key[1], key[3]), [0, 0, 0])
        cell[0] += 1
        cell[1] += a[key]["score"] == b[key]["score"]
        cell[2] += a[key]["output"].strip() == b[key]["output"].strip()
    rows = [{"length": length, "method": method, "answers": n, "same_score": score, "same_text": text}
            for (length, method), (n, score, text) in sorted(cells.items())]
    total = [sum(r[k] for r in rows) for k in ("answers", "same_score", "same_text")]
    rows.append({"length": "all", "method": "all", "answers": total[0], "same_score": total[1], "same_text": total[2]})
    return rows


def answers_by_sample(results: list[dict]) -> dict[tuple, dict]:
    """Each answer by (task, length, sample, method), with the Python of its run."""
    rows = {}
    for result in results:
        for r in result["rows"]:
            rows[(r["task"], r["length"], r["sample"], r["method"])] = {**r, "python": result.get("python")}
    return rows
