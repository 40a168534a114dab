"""The planner's memory model judged on peaks it was not fitted to: its three constants
(request_plan.PHASE1_MEMORY) fitted again with some measured peaks left out, and each
left-out peak predicted by the constants fitted without it.

The peaks the shipped constants were fitted to are judged with them (in sample); then they
are left out a group at a time, each configuration (ranks, strategy and layout, context) in
turn, each context length in turn and each strategy in turn, and the constants fitted by
least squares of the relative error to the rest predict the group left out (out of sample).
Peaks of runs the fit never saw (other commits, other numbers of GPUs) are judged with the
shipped constants. Most of them repeat the phase-1 work of a fitted peak (a rank of 4 GPUs
at 256K encodes and receives what a rank of 2 at 128K does) and are marked so; the others
are new to the fit in what the constants scale too.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass
from typing import Callable

import numpy as np
import torch

from ..checkpoint import load_config
from ..costs import Calibration, model_weights
from ..launch.control import Place
from ..request_plan import PHASE1_MEMORY, Phase1Memory, plan_request
from .speed import spec_of

# The model is linear in its three constants (in Phase1Memory's order): a peak's part that
# each one scales, and the part that none does (the weights and the KV slots).
BASIS = (Phase1Memory(1, 0, 0), Phase1Memory(0, 1, 0), Phase1Memory(0, 0, 1))
NONE = Phase1Memory(0, 0, 0)


@dataclass(frozen=True)
class Peak:
    """One rank's measured peak memory in one bench row, and what the model makes of it."""

    file: str
    ranks: int
    strategy: str
    context: int
    rank: int
    measured: int
    fixed: float  # the weights and the KV slots
    scaled: tuple[float, float, float]  # the parts the three constants scale: phase 1's work

    @property
    def configuration(self) -> tuple[int, str, int]:
        return self.ranks, self.strategy, self.context

    def predicted(self, phase1: Phase1Memory) -> float:
        return self.fixed + float(np.dot(self.scaled, astuple(phase1)))

    def error(self, phase1: Phase1Memory) -> float:
        return self.predicted(phase1) / self.measured - 1


def peaks_of(result: dict, file: str) -> list[Peak]:
    """Every rank's peak of every measured row of a bench result."""
    config = load_config(result["model"])
    element_size = getattr(torch, result.get("dtype", "bfloat16")).itemsize
    weights = model_weights(config) * element_size
    out = []
    for row in result["rows"]:
        if "ttft_s" not in row:
            continue
        spec = spec_of(row)
        # Balanced blocks as the run laid them out: by the shipped calibration, its default.
        plan = plan_request(spec.build(Place(0, result["ranks"]), None, config, Calibration.load()), row["context"],
                            result["query_tokens"], result["new_tokens"])
        fixed = plan.memory_bytes(config, element_size, phase1=NONE)
        scaled = [plan.memory_bytes(config, element_size, phase1=basis) for basis in BASIS]
        for rank, measured in enumerate(row["peak_mem_bytes"]):
            out.append(Peak(file, result["ranks"], spec.label, row["context"], rank, measured, weights + fixed[rank],
                            tuple(float(s[rank] - fixed[rank]) for s in scaled)))
    return out


def fit(peaks: list[Peak]) -> Phase1Memory:
    """The constants that minimise the sum of the peaks' squared relative errors."""
    a = np.array([[s / p.measured for s in p.scaled] for p in peaks])
    b = np.array([(p.measured - p.fixed) / p.measured for p in peaks])
    return Phase1Memory(*(float(c) for c in np.linalg.lstsq(a, b, rcond=None)[0]))


def held_out(peaks: list[Peak], key: Callable[[Peak], object]) -> list[dict]:
    """Each group of peaks (same key) left out in turn: the constants fitted to the rest and
    the left-out peaks' errors with them."""
    folds = []
    for group in sorted({key(p) for p in peaks}, key=str):
        rest = [p for p in peaks if key(p) != group]
        out = [p for p in peaks if key(p) == group]
        fitted = fit(rest)
        folds.append({"left_out": group, "fitted": asdict(fitted), "peaks_left_out": len(out),
                      "errors": [round(p.error(fitted), 3) for p in out],
                      "largest": round(max(abs(p.error(fitted)) for p in out), 3)})
    return folds


def judged(peaks: list[Peak], phase1: Phase1Memory, **extra: Callable[[Peak], object]) -> list[dict]:
    """Each peak's error with the constants `phase1`, and what `extra` says of it."""
    return [{"file": p.file, "ranks": p.ranks, "strategy": p.strategy, "context": p.context, "rank": p.rank,
             "measured_gib": round(p.measured / 2**30, 2), "error": round(p.error(phase1), 3),
             **{k: f(p) for k, f in extra.items()}} for p in peaks]


def out_of_sample(fitted: list[Peak], others: list[Peak]) -> dict:
    """The shipped constants on the peaks they were fitted to ("in_sample") and on `others`
    ("other_runs"), the folds of each way of leaving peaks out ("left_out"), and what each
    comes to ("summary")."""
    in_sample = judged(fitted, PHASE1_MEMORY)
    refit = fit(fitted)
    splits = {"configuration": held_out(fitted, lambda p: p.configuration),
              "context": held_out(fitted, lambda p: p.context),
              "strategy": held_out(fitted, lambda p: p.strategy)}
    fitted_work = {p.scaled for p in fitted}
    other_rows = judged(others, PHASE1_MEMORY, work_in_fit=lambda p: p.scaled in fitted_work)
    summary = {
        "in_sample": {"peaks": len(in_sample), "largest": _largest(in_sample)},
        "refit_on_all_in_sample": {"fitted": asdict(refit),
                                   "largest": round(max(abs(p.error(refit)) for p in fitted), 3)},
        **{f"left_out_by_{name}": {"folds": len(folds), "peaks": sum(f["peaks_left_out"] for f in folds),
                                   "largest": max(f["largest"] for f in folds)} for name, folds in splits.items()},
        "other_runs_work_in_fit": {"peaks": sum(r["work_in_fit"] for r in other_rows),
                                   "largest": _largest([r for r in other_rows if r["work_in_fit"]])},
        "other_runs_work_not_in_fit": {"peaks": sum(not r["work_in_fit"] for r in other_rows),
                                       "largest": _largest([r for r in other_rows if not r["work_in_fit"]])},
    }
    return {"in_sample": in_sample, "left_out": splits, "other_runs": other_rows, "summary": summary}


def _largest(rows: list[dict]) -> float | None:
    return max((abs(r["error"]) for r in rows), default=None)
