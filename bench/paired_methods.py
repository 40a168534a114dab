"""Two methods of an evaluation, sample by sample, with an exact sign test of whether they
differ (star_engine/measure/paired_methods.py).

  python bench/paired_methods.py --eval EVAL.json [...] --a "star 4b a=1" --b "star 4b a=1 balanced" --name NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from star_engine.measure.paired_methods import paired
from star_engine.measure.text_table import text_table

from results_io import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="evaluation JSON(s)")
    parser.add_argument("--a", required=True, help="one method's label")
    parser.add_argument("--b", required=True, help="the other's")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    rows = paired([json.loads(p.read_text()) for p in args.eval], args.a, args.b)
    print(f"a = {args.a}, b = {args.b}")
    print(text_table(rows, ["length", "samples", "mean_a", "mean_b", "a_higher", "b_higher", "ties", "p_value"]))
    print("saved", save(args.name, rows, evals=[str(p) for p in args.eval], a=args.a, b=args.b))


if __name__ == "__main__":
    main()
