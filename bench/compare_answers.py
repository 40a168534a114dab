"""How often two evaluation runs of the same samples answer alike: the same score, the same
text, per length and method. Used to show that the GPU path (bf16) answers as the CPU path
(float32) does.

  python bench/compare_answers.py --a GPU.json --b CPU.json [CPU2.json ...] --name NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_io import save, table


def rows_by_sample(paths: list[Path]) -> dict[tuple, dict]:
    rows = {}
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            rows[(r["task"], r["length"], r["sample"], r["method"])] = r
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, nargs="+", required=True, help="evaluation JSON(s) of one run")
    parser.add_argument("--b", type=Path, nargs="+", required=True, help="evaluation JSON(s) of the other")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    a, b = rows_by_sample(args.a), rows_by_sample(args.b)
    cells: dict[tuple, list[int]] = {}
    for key in sorted(a.keys() & b.keys()):
        cell = cells.setdefault((key[1], key[3]), [0, 0, 0])
        cell[0] += 1
        cell[1] += a[key]["score"] == b[key]["score"]
        cell[2] += a[key]["output"].strip() == b[key]["output"].strip()
    rows = [{"length": length, "method": method, "answers": n, "same_score": score, "same_text": text}
            for (length, method), (n, score, text) in sorted(cells.items())]
    total = [sum(r[k] for r in rows) for k in ("answers", "same_score", "same_text")]
    rows.append({"length": "all", "method": "all", "answers": total[0], "same_score": total[1], "same_text": total[2]})
    print(table(rows, ["length", "method", "answers", "same_score", "same_text"]))
    print("saved", save(args.name, rows, a=[str(p) for p in args.a], b=[str(p) for p in args.b]))


if __name__ == "__main__":
    main()
