"""Two methods compared sample by sample, with an exact sign test."""

from __future__ import annotations

import pytest

from star_engine.measure.paired_methods import paired, sign_test


def test_the_sign_test_is_the_exact_binomial_one():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)  # both tails of a fair coin
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)


def test_samples_are_paired_by_task_length_and_seed_and_ties_do_not_count():
    rows = [{"task": "vt", "length": n, "sample": s, "method": m, "score": score}
            for n, s, m, score in [(1024, 0, "u", 1.0), (1024, 0, "b", 0.0), (1024, 1, "u", 1.0), (1024, 1, "b", 1.0),
                                   (2048, 0, "u", 0.5), (2048, 0, "b", 1.0), (2048, 1, "u", 0.0)]]  # the last unpaired
    by_length = {r["length"]: r for r in paired([{"python": "3.11.7", "rows": rows}], "u", "b")}
    assert (by_length[1024]["a_higher"], by_length[1024]["b_higher"], by_length[1024]["ties"]) == (1, 0, 1)
    assert by_length[2048]["samples"] == 1 and by_length[2048]["b_higher"] == 1
    assert by_length["all"]["samples"] == 3 and by_length["all"]["mean_a"] == pytest.approx(2.5 / 3)


def test_a_task_whose_document_depends_on_python_pairs_only_within_one_python():
    def result(python: str, method: str, score: float) -> dict:
        return {"python": python, "rows": [{"task": "niah_single_2", "length": 1024, "sample": 0, "method": method,
                                            "score": score}]}

    apart = paired([result("3.11.7", "u", 1.0), result("3.12.3", "b", 0.0)], "u", "b")
    assert apart[-1]["samples"] == 0
    both = result("3.12.3", "u", 1.0)["rows"] + result("3.12.3", "b", 0.0)["rows"]
    together = paired([{"python": "3.12.3", "rows": both}], "u", "b")
    assert together[-1]["samples"] == 1 and together[-1]["a_higher"] == 1
