"""The planner's memory model judged on peaks it was not fitted to (star_engine/measure/
memory_fit.py says how).

  python bench/plan_memory_out_of_sample.py --fitted RUNS --others RUNS --name NAME

--fitted: the bench runs whose per-rank peaks the shipped constants were fitted to;
--others: runs the fit never saw (other commits, other numbers of GPUs) of the same device.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from star_engine.measure.memory_fit import out_of_sample, peaks_of
from star_engine.measure.text_table import text_table
from star_engine.request_plan import PHASE1_MEMORY

from results_io import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fitted", type=Path, nargs="+", required=True,
                        help="bench JSON files whose peaks the shipped constants were fitted to")
    parser.add_argument("--others", type=Path, nargs="*", default=[],
                        help="bench JSON files of other runs of the same device")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    results = {path: json.loads(path.read_text()) for path in [*args.fitted, *args.others]}
    device = results[args.fitted[0]]["device"]
    fitted = [p for path in args.fitted for p in peaks_of(results[path], path.name)]
    others = []
    for path in args.others:
        if results[path]["device"] != device:
            print(f"left out {path.name}: measured on {results[path]['device']}, the fit on {device}")
            continue
        others += peaks_of(results[path], path.name)

    judged = out_of_sample(fitted, others)
    print(text_table(judged["other_runs"], ["file", "ranks", "strategy", "context", "rank", "measured_gib", "error",
                                            "work_in_fit"]))
    for name, folds in judged["left_out"].items():
        print(f"left out by {name}:")
        print(text_table([{"left out": str(f["left_out"]), "encoded": f["fitted"]["encoded_vectors_per_token"],
                           "received": f["fitted"]["received_vectors_per_token"],
                           "workspace GiB": f["fitted"]["workspace_bytes"] / 2**30, "largest error": f["largest"]}
                          for f in folds], ["left out", "encoded", "received", "workspace GiB", "largest error"]))
    for key, value in judged["summary"].items():
        print(f"{key}: {value}")
    print("saved", save(args.name, judged["in_sample"], shipped=asdict(PHASE1_MEMORY), fit_device=device,
                        summary=judged["summary"], left_out=judged["left_out"], other_runs=judged["other_runs"],
                        fitted_results=[str(p) for p in args.fitted], other_results=[str(p) for p in args.others]))


if __name__ == "__main__":
    main()
