"""The planner's memory model fitted again without the peaks it then predicts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from star_engine.attention.spec import StrategySpec
from star_engine.measure.memory_fit import fit, held_out, peaks_of
from star_engine.request_plan import Phase1Memory

TRUTH = Phase1Memory(encoded_vectors_per_token=4.0, received_vectors_per_token=3.0, workspace_bytes=3 << 28)


def peaks_made_by(phase1: Phase1Memory):
    """The per-rank peaks of a 2-rank bench run of star (both layouts) and ring at three
    lengths, as the model with `phase1` predicts them."""
    specs = [StrategySpec("star", layout="uniform"), StrategySpec("star", layout="balanced"), StrategySpec("ring")]
    rows = [{"attn": spec.attn, "spec": spec.as_dict(), "context": context, "ttft_s": 1.0, "peak_mem_bytes": [1, 1]}
            for spec in specs for context in (32768, 65536, 131072)]
    result = {"model": "llama-3.1-8b", "ranks": 2, "query_tokens": 64, "new_tokens": 32, "rows": rows}
    return [replace(p, measured=round(p.predicted(phase1))) for p in peaks_of(result, "run.json")]


def test_the_fit_finds_the_constants_the_peaks_were_made_with():
    fitted = fit(peaks_made_by(TRUTH))
    assert fitted.encoded_vectors_per_token == pytest.approx(4.0, rel=1e-6)
    assert fitted.received_vectors_per_token == pytest.approx(3.0, rel=1e-6)
    assert fitted.workspace_bytes == pytest.approx(3 << 28, rel=1e-4)


def test_each_group_left_out_is_predicted_by_constants_fitted_without_it():
    # The 64K peaks read 10% high: constants fitted to the rest still find the truth, and
    # so miss those peaks by the 10%; were they in the fit, they would pull it towards them.
    peaks = [replace(p, measured=round(p.measured * 1.1)) if p.context == 65536 else p for p in peaks_made_by(TRUTH)]
    folds = {fold["left_out"]: fold for fold in held_out(peaks, lambda p: p.context)}
    assert folds[65536]["fitted"]["encoded_vectors_per_token"] == pytest.approx(4.0, rel=1e-6)
    assert folds[65536]["errors"] == [pytest.approx(1 / 1.1 - 1, abs=1e-3)] * 6
    assert folds[65536]["largest"] == pytest.approx(1 - 1 / 1.1, abs=1e-3)
    assert folds[32768]["fitted"]["encoded_vectors_per_token"] != pytest.approx(4.0, rel=1e-3)
