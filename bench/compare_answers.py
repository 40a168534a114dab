"""How often two evaluation runs of the same samples answer alike, per length and method.

Used to show that the GPU path (bf16) answers as the CPU path (float32) does;
star_engine/measure/answer_agreement.py says what counts.

  python bench/compare_answers.py --a GPU.json --b CPU.json [CPU2.json ...] --name NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from star_engine.measure.answer_agreement import agreement
from star_engine.measure.text_table import text_table

from results_io import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, nargs="+", required=True, help="evaluation JSON(s) of one run")
    parser.add_argument("--b", type=Path, nargs="+", required=True, help="evaluation JSON(s) of the other")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    rows = agreement([json.loads(p.read_text()) for p in args.a], [json.loads(p.read_text()) for p in args.b])
    print(text_table(rows, ["length", "method", "answers", "same_score", "same_text"]))
    print("saved", save(args.name, rows, a=[str(p) for p in args.a], b=[str(p) for p in args.b]))


if __name__ == "__main__":
    main()
