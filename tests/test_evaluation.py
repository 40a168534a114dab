"""How evaluation results are summarised: mean per cell, star relative to dense."""

from __future__ import annotations

import pytest

from star_engine.evaluation import methods, parse_anchor, summarise, table


def test_methods_cross_blocks_and_anchors_and_name_themselves():
    listed = methods(["star", "dense"], [2, 4], [0.25, 1.0])
    assert [m.name for m in listed] == ["star 2b a=1/4", "star 2b a=1", "star 4b a=1/4", "star 4b a=1", "dense"]


def test_anchor_sizes_are_fractions_of_the_block():
    assert [parse_anchor(t) for t in ("1/4", "0.5", "block")] == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError):
        parse_anchor("3/2")


def test_summary_averages_cells_and_relates_star_to_dense():
    rows = [{"task": "t", "length": 1024, "method": m, "score": s}
            for m, s in [("dense", 1.0), ("dense", 0.5), ("star 4b a=1", 0.5), ("star 4b a=1", 0.25)]]
    summary = {s["method"]: s for s in summarise(rows)}
    assert summary["dense"]["accuracy"] == 0.75 and summary["dense"]["samples"] == 2
    assert summary["star 4b a=1"]["relative_to_dense"] == pytest.approx(0.5)
    text = table(list(summary.values()))
    assert "0.38 (50%)" in text and "0.75" in text

