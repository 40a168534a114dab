"""The H200 calibration shipped with star_engine: the rates of the per-token work and of
attention, fitted (least squares on relative error) to measured phase-1 times.

  python bench/calibration_from_prefill.py [--results bench/results/prefill_mfu.json]

Each row of bench/prefill_mfu.py is one rank encoding two blocks (block 0 alone, block 1
after an anchor of a block) of the llama-3.1-8b preset: its time is modelled as linear
FLOPs / linear rate + attention FLOPs / attention rate. Writes
star_engine/calibrations/nvidia-h200.json and prints each row's fit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from star_engine.costs import DEFAULT_CALIBRATION, attention_flops_per_pair, linear_flops_per_token
from star_engine.model import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "prefill_mfu.json")
    parser.add_argument("--output", type=Path, default=DEFAULT_CALIBRATION)
    args = parser.parse_args()
    measured = json.loads(args.results.read_text())
    config = PRESETS[measured["model"]]
    flops, seconds = [], []
    for row in measured["rows"]:
        block = row["block"]
        pairs = block * (block + 1) / 2 + block * block + block * (block + 1) / 2
        flops.append((2 * block * linear_flops_per_token(config), pairs * attention_flops_per_pair(config)))
        seconds.append(row["seconds"])
    flops, seconds = np.array(flops), np.array(seconds)
    inverse_rates, *_ = np.linalg.lstsq(flops / seconds[:, None], np.ones(len(seconds)), rcond=None)
    predicted = flops @ inverse_rates
    for row, want, got in zip(measured["rows"], seconds, predicted):
        print(f"block {row['block']:>7}: measured {want:8.3f} s, fitted {got:8.3f} s ({got / want - 1:+.1%})")
    calibration = {
        "device": measured["device"],
        "linear_flops_per_s": float(1 / inverse_rates[0]),
        "attention_flops_per_s": float(1 / inverse_rates[1]),
        "source": f"fit to {len(seconds)} phase-1 times of bench/prefill_mfu.py ({measured['model']}, "
                  f"commit {measured['commit']}, {measured['date'][:10]}); largest error "
                  f"{max(abs(predicted / seconds - 1)):.1%}",
    }
    args.output.write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"linear {calibration['linear_flops_per_s'] / 1e12:.0f} TFLOP/s, attention "
          f"{calibration['attention_flops_per_s'] / 1e12:.0f} TFLOP/s -> {args.output}")


if __name__ == "__main__":
    main()
