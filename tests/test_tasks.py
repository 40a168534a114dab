"""Synthetic long-context tasks: exact lengths in the model's tokens, deterministic, and
answers that the document really supports."""

from __future__ import annotations

import collections
import re

import pytest

from star_engine.measure.tasks import TASKS, make_sample, score
from star_engine.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct", (2,))


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1000, 4096])
def test_samples_have_exactly_the_length_asked_for(tokenizer, task, length):
    sample = make_sample(task, tokenizer, length, seed=0)
    assert len(sample.context_ids) + len(sample.query_ids) == length
    assert sample.query in tokenizer.decode(sample.query_ids)
    assert tokenizer.decode(sample.query_ids).endswith(sample.answer_prefix)


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_the_same_for_a_seed_and_differ_across_seeds(tokenizer, task):
    a, b, c = (make_sample(task, tokenizer, 1500, seed) for seed in (3, 3, 4))
    assert a == b
    assert a.context_ids != c.context_ids


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah") or t == "vt"])
def test_every_expected_answer_stands_in_the_document(tokenizer, task):
    for seed in range(3):
        sample = make_sample(task, tokenizer, 2000, seed)
        document = tokenizer.decode(sample.context_ids)
        for answer in sample.answers:
            assert answer in document


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah") or t == "vt"])
def test_a_sample_knows_where_each_of_its_needles_stands(tokenizer, task):
    sample = make_sample(task, tokenizer, 2000, seed=0)
    assert len(sample.needle_starts) == len(sample.needles) > 0
    assert list(sample.needle_starts) == sorted(sample.needle_starts)
    for needle, start in zip(sample.needles, sample.needle_starts):
        assert tokenizer.decode(sample.context_ids[start:]).lstrip().startswith(needle)


def test_variable_tracking_chains_each_variable_to_the_previous_one(tokenizer):
    sample = make_sample("vt", tokenizer, 2000, seed=1)
    document = tokenizer.decode(sample.context_ids)
    names = sample.answers
    value = re.search(r"value (\d+)", sample.query).group(1)
    assert f"VAR {names[0]} = {value}." in document
    for previous, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {previous}." in document
    # in order: each hop comes after the one it refers to
    positions = [document.index(f"VAR {name} =") for name in names]
    assert positions == sorted(positions)


@pytest.mark.parametrize("task,top", [("cwe", 10), ("fwe", 3)])
def test_the_expected_words_are_the_most_frequent_in_the_document(tokenizer, task, top):
    for seed in range(3):
        sample = make_sample(task, tokenizer, 4096, seed)
        words = re.findall(r"[a-z]+", tokenizer.decode(sample.context_ids).split("<|im_start|>user")[-1])
        counts = collections.Counter(words)
        assert set(sample.answers) == {w for w, _ in counts.most_common(top)}


def test_byte_tokenized_presets_get_samples_too():
    sample = make_sample("niah_multiquery", ByteTokenizer(512), 3000, seed=0)
    assert len(sample.context_ids) + len(sample.query_ids) == 3000


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        make_sample("niah_multivalue", ByteTokenizer(512), 200, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("niah_single_9", ByteTokenizer(512), 2000, seed=0)


def test_score_is_the_fraction_of_expected_strings_found():
    assert score("The numbers are 123 and 456.", ("123", "456")) == 1.0
    assert score("It is 123.", ("123", "456")) == 0.5
    assert score("No idea.", ("123",)) == 0.0
    assert score("AMBER", ("amber",)) == 1.0


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_distractor_needles_never_name_the_queried_key(tokenizer, task):
    for seed in range(5):
        sample = make_sample(task, tokenizer, 4096, seed)
        document = tokenizer.decode(sample.context_ids)
        key = re.search(r"number for (\S+) mentioned", sample.query).group(1)
        assert document.count(f"numbers for {key} is:") == 1


def test_the_question_is_the_first_of_the_query_ids_before_the_chat_templates_tail():
    tokenizer = load_tokenizer("smollm2-135m-instruct", ())
    sample = make_sample("niah_multikey_repeated", tokenizer, 1000, seed=0)
    question = tokenizer.decode(sample.query_ids[:sample.question_tokens])
    assert question.strip() == sample.query
    assert "assistant" in tokenizer.hf.decode(sample.query_ids[sample.question_tokens:])
