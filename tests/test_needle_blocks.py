"""Which star block held each needle: each expected value is counted in the star block that
holds its needle, paired with dense on the same sample."""

from __future__ import annotations

import collections

import pytest

from star_engine.attention.star import block_tokens
from star_engine.measure.needle_blocks import values_by_block
from star_engine.measure.tasks import make_sample
from star_engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct", (2,))


def row(sample, seed: int, method: str, output: str) -> dict:
    return {"task": sample.task, "length": 1000, "sample": seed, "method": method, "output": output,
            "answers": list(sample.answers)}


def test_values_are_counted_in_the_block_of_their_needle_as_lost_or_gained_against_dense(tokenizer):
    seed = 11  # rows name their sample by its seed, whatever the run's first seed was
    sample = make_sample("niah_multivalue", tokenizer, 1000, seed)
    first, *rest = sample.answers
    result = {"seed": 3, "rows": [row(sample, seed, "dense", " ".join(rest)),
                                  row(sample, seed, "star 4b a=1", first)]}
    rows = values_by_block([result], tokenizer)

    block_size = block_tokens(len(sample.context_ids), None, 4)
    blocks = [start // block_size for start in sample.needle_starts]
    expected = collections.Counter()
    for needle, block in zip(sample.needles, blocks):
        value = next(a for a in sample.answers if needle.endswith(f": {a}."))
        expected[block, "lost"] += value != first  # dense found it, star did not
        expected[block, "gained"] += value == first  # star found it, dense did not
        expected[block, "values"] += 1
    assert {r["method"] for r in rows} == {"star 4b a=1"}  # dense is the reference, not a row
    assert sorted(r["needle_block"] for r in rows) == sorted(set(blocks))
    for r in rows:
        for k in ("values", "lost", "gained"):
            assert r[k] == expected[r["needle_block"], k]
    assert sum(r["lost"] for r in rows) == len(rest) and sum(r["gained"] for r in rows) == 1


def test_results_whose_answers_the_task_no_longer_gives_are_refused(tokenizer):
    sample = make_sample("niah_single_1", tokenizer, 1000, 0)
    wrong = row(sample, 0, "dense", "")
    wrong["answers"] = ["not the value"]
    with pytest.raises(ValueError, match="differ from the evaluation"):
        values_by_block([{"seed": 0, "rows": [wrong]}], tokenizer)
