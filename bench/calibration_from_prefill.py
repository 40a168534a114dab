"""The H200 calibration shipped with star_engine: the rates of the per-token work and of
attention, fitted (least squares on relative error) to measured phase-1 times, and the
copy bandwidth and gather_merge latency a bench run measured. `plan --calibrate` measures
all of them (the link and the overheads too) on the machine it runs on.

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

from star_engine.costs import (DEFAULT_CALIBRATION, Calibration, attention_flops_per_pair, fit_rates,
                               linear_flops_per_token)
from star_engine.config import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "prefill_mfu.json")
    parser.add_argument("--ceilings", type=Path,
                        default=Path(__file__).parent / "results" / "e2e_star_llama-3.1-8b_2ranks_peer_gather.json",
                        help="a bench result whose measured ceilings (copy bandwidth, gather_merge) to take")
    parser.add_argument("--output", type=Path, default=DEFAULT_CALIBRATION)
    args = parser.parse_args()
    measured = json.loads(args.results.read_text())
    config = PRESETS[measured["model"]]
    linear, attention, seconds = [], [], []
    for row in measured["rows"]:
        block = row["block"]
        pairs = block * (block + 1) / 2 + block * block + block * (block + 1) / 2
        linear.append(2 * block * linear_flops_per_token(config))
        attention.append(pairs * attention_flops_per_pair(config))
        seconds.append(row["seconds"])
    linear_rate, attention_rate = fit_rates(linear, attention, seconds)
    errors = []
    for row, lin, att, want in zip(measured["rows"], linear, attention, seconds):
        got = lin / linear_rate + att / attention_rate
        errors.append(got / want - 1)
        print(f"block {row['block']:>7}: measured {want:8.3f} s, fitted {got:8.3f} s ({errors[-1]:+.1%})")
    ceilings = json.loads(args.ceilings.read_text())
    calibration = Calibration(
        device=measured["device"], linear_flops_per_s=linear_rate, attention_flops_per_s=attention_rate,
        copy_bandwidth_Bps=ceilings["copy_bandwidth_Bps"],
        gather_merge_s_per_layer=ceilings["gather_merge_s_per_layer"],
        source=f"rates fitted to {len(seconds)} phase-1 times of bench/prefill_mfu.py ({measured['model']}, "
               f"commit {measured['commit']}, {measured['date'][:10]}; largest error {max(map(abs, errors)):.1%}); "
               f"copy bandwidth and gather_merge as {args.ceilings.name} measured them (commit "
               f"{ceilings['commit']}, {ceilings['ranks']} ranks); link and overheads not measured")
    calibration.save(args.output)
    print(f"linear {linear_rate / 1e12:.0f} TFLOP/s, attention {attention_rate / 1e12:.0f} TFLOP/s -> {args.output}")


if __name__ == "__main__":
    main()
