"""Star variants against star as published and dense: what share of the gap they close."""

from __future__ import annotations

from star_engine.measure.levers import against, against_published, blocks_of, published, with_question


def test_a_variant_is_compared_with_star_as_published_with_as_many_blocks():
    assert published("star 4b a=1 balanced +q") == "star 4b a=1 balanced"
    assert published("star 8b a=1/8 balanced w=1/2 T=1.1") == "star 8b a=1 balanced"
    assert published("star 8b a=1/8 balanced pw=1/2 +q") == "star 8b a=1 balanced"  # a window passed on
    assert published("star 4b a=1 balanced +q r=0.05") == "star 4b a=1 balanced"  # a recompute
    assert published("star 4b a=1 balanced") == "star 4b a=1 balanced"
    assert blocks_of("star 8b a=1 balanced +q") == 8 and blocks_of("dense") is None


def test_a_variant_is_also_compared_with_the_default_star_which_reads_the_question():
    assert with_question("star 4b a=1/8 balanced w=1/2 +q") == "star 4b a=1 balanced +q"
    assert with_question("star 8b a=1/4 balanced") == "star 8b a=1 balanced +q"


def rows(method: str, scores: list[float]) -> list[dict]:
    return [{"task": "vt" if i % 2 else "niah_single_1", "length": 2048, "sample": i, "method": method, "score": s}
            for i, s in enumerate(scores)]


def test_the_gap_closed_is_the_variants_gain_over_published_stars_loss_to_dense():
    evaluation = {"rows": rows("dense", [1] * 8) + rows("star 4b a=1", [1, 0, 0, 0, 1, 0, 0, 0])
                  + rows("star 4b a=1 +q", [1, 1, 1, 0, 1, 0, 0, 0])}
    result = against_published([evaluation], "star 4b a=1 +q")
    assert result["accuracy"] == 0.5 and result["published"] == 0.25 and result["dense"] == 1.0
    assert result["gap_closed"] == 1 / 3  # 0.25 of the 0.75 lost
    assert (result["higher_than_published"], result["lower_than_published"]) == (2, 0)
    assert result["p_against_published"] == 0.5  # two wins of two: a fair coin does this half the time
    vt = against_published([evaluation], "star 4b a=1 +q", {"vt"})
    assert vt["samples"] == 4 and vt["accuracy"] == 0.25 and vt["published"] == 0.0


def test_a_variant_that_answered_part_of_the_samples_is_judged_on_those_alone():
    evaluation = {"rows": rows("dense", [1, 1, 1, 0]) + rows("star 4b a=1", [1, 0, 0, 0])
                  + rows("star 4b a=1 +q", [1, 1])}
    result = against_published([evaluation], "star 4b a=1 +q")
    assert result["samples"] == 2 and result["dense"] == 1.0 and result["published"] == 0.5
    assert result["gap_closed"] == 1.0


def test_a_variant_against_any_other_is_counted_sample_by_sample():
    evaluation = {"rows": rows("star 4b a=1 +q", [1, 1, 0, 0]) + rows("star 4b a=1/8 +q", [1, 0, 1, 1])}
    result = against([evaluation], "star 4b a=1/8 +q", "star 4b a=1 +q")
    assert (result["samples"], result["higher"], result["lower"]) == (4, 2, 1)
    assert result["p"] == 1.0  # two against one: no difference
