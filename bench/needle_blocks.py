"""Which star block held each needle, and what star lost and gained there against dense.

Rereads evaluation results; star_engine/measure/needle_blocks.py says how values count.

  python bench/needle_blocks.py --eval RESULT.json [...] --name NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from star_engine.measure.needle_blocks import last_block_against_the_others, values_by_block
from star_engine.measure.text_table import text_table
from star_engine.tokenizer import load_tokenizer

from results_io import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="evaluation JSON(s)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer made the samples")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model, ())
    rows = values_by_block([json.loads(path.read_text()) for path in args.eval], tokenizer)
    print(text_table(rows, ["length", "method", "needle_block", "values", "found", "dense_found", "lost", "gained"]))
    summary = last_block_against_the_others(rows)
    print(text_table(summary, ["method", "needles_in", "values", "lost", "gained", "net"]))
    print("saved", save(args.name, rows, evals=[str(p) for p in args.eval], summary=summary))


if __name__ == "__main__":
    main()
