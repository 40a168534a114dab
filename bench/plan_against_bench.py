"""The planner's predictions against measured bench rows: phase 1, time to first token, time
per output token and peak memory, each row's relative error, and how many are within 15%.

  python bench/plan_against_bench.py --results bench/results/e2e_*.json --calibration FILE --name NAME

Each row is predicted with the strategy and layout it ran, from the model's shape and the
calibration (a device's measured rates; rows of other devices are left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from star_engine.checkpoint import load_config
from star_engine.costs import Calibration
from star_engine.prediction import predict
from star_engine.measure.speed import spec_of
from star_engine.measure.text_table import text_table

from results_io import save

MEASURES = (("phase1_s", "phase1_s"), ("ttft_s", "ttft_s"), ("tpot_s", "tpot_s"))


def compare(result: dict, calibration: Calibration) -> list[dict]:
    config = load_config(result["model"])
    element_size = getattr(torch, result.get("dtype", "bfloat16")).itemsize
    out = []
    for row in result["rows"]:
        if "ttft_s" not in row:
            continue
        p = predict(config, spec_of(row), result["ranks"], row["context"], result["query_tokens"],
                    result["new_tokens"], calibration, element_size)
        entry = {"file": result["file"], "commit": result.get("commit"), "ranks": result["ranks"],
                 "strategy": p.label, "context": row["context"]}
        for measured, predicted in MEASURES:
            if row.get(measured) is not None:
                entry[f"{measured}_error"] = round(getattr(p, predicted) / row[measured] - 1, 3)
        entry["memory_error"] = round(p.memory_bytes / max(row["peak_mem_bytes"]) - 1, 3)
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, nargs="+", required=True, help="bench JSON files")
    parser.add_argument("--calibration", type=Path, default=None, help="default: the shipped one")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    calibration = Calibration.load(args.calibration)
    rows = []
    for path in args.results:
        result = json.loads(path.read_text())
        if result["device"] != calibration.device:
            print(f"left out {path.name}: measured on {result['device']}, the calibration is of {calibration.device}")
            continue
        rows += compare({**result, "file": path.name}, calibration)
    columns = ["file", "ranks", "strategy", "context", "phase1_s_error", "ttft_s_error", "tpot_s_error", "memory_error"]
    print(text_table(rows, columns))
    summary = {}
    for key in columns[4:]:
        errors = [abs(r[key]) for r in rows if key in r]
        summary[key] = {"rows": len(errors), "within_15%": sum(e <= 0.15 for e in errors),
                        "largest": max(errors) if errors else None}
        print(f"{key}: {summary[key]['within_15%']} of {len(errors)} rows within 15%, largest {summary[key]['largest']}")
    print("saved", save(args.name, rows, calibration=calibration.__dict__, summary=summary,
                        results=[str(p) for p in args.results]))


if __name__ == "__main__":
    main()
