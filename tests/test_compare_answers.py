"""How often two runs answered the same samples alike."""

from __future__ import annotations

from star_engine.measure.answer_agreement import agreement


def result(python: str | None, answers: dict[tuple, tuple[float, str]]) -> dict:
    rows = [{"task": task, "length": 1024, "sample": sample, "method": method, "score": score, "output": output}
            for (task, sample, method), (score, output) in answers.items()]
    return {"python": python, "rows": rows}


def test_answers_are_paired_by_sample_and_method_and_compared_by_score_and_text():
    a = result("3.12.3", {("niah_single_1", 0, "dense"): (1.0, "It is 42."),
                          ("niah_single_1", 0, "star 4b a=1"): (1.0, "The number is 42."),
                          ("niah_single_1", 1, "dense"): (0.0, "None."),
                          ("vt", 0, "dense"): (1.0, "X1")})  # not in b: not counted
    b = result("3.11.9", {("niah_single_1", 0, "dense"): (1.0, " It is 42. "),
                          ("niah_single_1", 0, "star 4b a=1"): (1.0, "42"),
                          ("niah_single_1", 1, "dense"): (1.0, "42")})
    rows = agreement([a], [b])
    assert rows[-1] == {"length": "all", "method": "all", "answers": 3, "same_score": 2, "same_text": 1}
    assert {(r["method"], r["answers"], r["same_score"], r["same_text"]) for r in rows[:-1]} == {
        ("dense", 2, 1, 1), ("star 4b a=1", 1, 1, 0)}


def test_prose_samples_count_only_where_both_runs_had_the_same_python():
    answers = {("niah_single_2", 0, "dense"): (1.0, "42")}
    for a_python, b_python, counted in (("3.12.3", "3.12.3", 1), ("3.12.3", "3.11.9", 0), (None, None, 0)):
        assert agreement([result(a_python, answers)], [result(b_python, answers)])[-1]["answers"] == counted
