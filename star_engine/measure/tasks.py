"""Synthetic long-context tasks in the manner of RULER (Hsieh et al., 2024, "RULER: What's
the Real Context Size of Your Long-Context Language Models?"), written here, under RULER's
task names, generated deterministically from a seed.

A task is a set of facts (needles) hidden in a haystack, a question, and the strings the
answer must contain. `make_sample` assembles the prompt from token ids so that context and
query together are exactly the length asked for, in the model's own tokens and chat
template: the haystack is cut to fit, the needles are kept whole, at unit boundaries.
Score: the fraction of expected strings found in the output (RULER's string match).

Haystacks: sentences of plain filler written here (niah_single_1 and most others), one
sentence written here repeated (niah_multikey_repeated), English
prose from the Python Language Reference that CPython ships (niah_single_2; PSF License),
UUID-like noise (niah_single_3), or distractor needles (niah_multikey_2/3).
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

# Plain filler prose (written here), in random order: the "repeated filler" haystack.
_FILLER = (
    "The river ran slowly past the old mill, and the morning fog lifted from the fields.",
    "Farmers in the valley planted barley in spring and harvested it before the autumn rains.",
    "The library on the hill kept maps of every road that had ever crossed the county.",
    "Each evening the baker set out loaves to cool on the wide stone sill of the window.",
    "Travellers rested at the inn by the bridge, where the soup was thick and the fire warm.",
    "A narrow path climbed through the pine wood to a lookout over the whole bay.",
    "The town clock had stopped at a quarter past four years ago, and nobody had fixed it.",
    "In winter the lake froze hard enough for children to skate from one shore to the other.",
    "The ferry crossed twice a day, carrying post, sheep and the occasional curious visitor.",
    "Old letters in the attic described storms, weddings and the price of salt in each season.",
)
# One sentence, repeated: the haystack in which every stretch of context looks alike, so
# that a block encoded without its neighbours differs from them only by its needles.
_REPEATED = "The grass is cut every Sunday and the hedge is trimmed once a month."
_SYLLABLES = ("ka", "lo", "mi", "ten", "ra", "vu", "sel", "po", "dar", "ni", "qua", "bel", "tor",
              "fi", "gan", "zo", "mer", "li", "os", "pra")


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def frame(self, query: str) -> tuple[list[int], list[int]]: ...
    def question_tokens(self, query: str) -> int: ...


@dataclass(frozen=True)
class Task:
    """What one sample of a task says, before it is fitted to a length."""

    needles: tuple[str, ...]  # facts, inserted in this order at increasing depths
    haystack: Callable[[random.Random], Iterator[str]]  # endless stream of filler units
    query: str
    answers: tuple[str, ...]
    answer_prefix: str  # the start of the answer, given to the model after the question


@dataclass(frozen=True)
class Sample:
    task: str
    context_ids: list[int]  # template head + document
    query_ids: list[int]  # the question, the template's tail and the start of the answer
    query: str
    answer_prefix: str
    answers: tuple[str, ...]
    needles: tuple[str, ...]  # the facts, in the order they stand in the context
    needle_starts: tuple[int, ...]  # where each begins in context_ids
    question_tokens: int  # the first query_ids that are the question (before the template's tail)


def score(output: str, answers: tuple[str, ...]) -> float:
    """Fraction of the expected strings found in the output (case-insensitive)."""
    text = output.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _words(rng: random.Random, n: int) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < n:
        words[_word(rng)] = None
    return list(words)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _filler(rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(_FILLER)


def _repeated(rng: random.Random) -> Iterator[str]:
    while True:
        yield _REPEATED


@functools.cache
def _prose_sentences() -> tuple[str, ...]:
    """Sentences of English prose, in reading order, from the Python Language Reference
    that CPython ships in its standard library (pydoc_data.topics; Python Software
    Foundation License): the natural-prose haystack. Code samples and paragraphs that are
    mostly symbols are left out. The text is the running Python's, so it can differ
    between Python versions."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if paragraph.startswith(" ") or len(paragraph) < 200:
                continue  # code samples, grammar rules and headings are indented or short
            text = " ".join(paragraph.split())
            if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.9:
                continue
            sentences += re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return tuple(sentences)


def _prose(rng: random.Random) -> Iterator[str]:
    sentences = _prose_sentences()
    start = rng.randrange(len(sentences))
    for i in itertools.count(start):
        yield sentences[i % len(sentences)]


def _uuid_noise(rng: random.Random) -> Iterator[str]:
    while True:
        yield f"{_uuid(rng)}."


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _needle_stream(key_of: Callable[[random.Random], str], value_of: Callable[[random.Random], str],
                   queried: str) -> Callable[[random.Random], Iterator[str]]:
    """A haystack made of distractor needles, none of them for the queried key."""
    def stream(r: random.Random) -> Iterator[str]:
        while True:
            key = key_of(r)
            if key != queried:
                yield _needle(key, value_of(r))
    return stream


def _niah(rng: random.Random, haystack, keys: list[str], values: list[list[str]], queried: list[int]) -> Task:
    needles = [_needle(keys[i], v) for i in range(len(keys)) for v in values[i]]
    rng.shuffle(needles)
    answers = tuple(v for i in queried for v in values[i])
    asked = [keys[i] for i in queried]
    what = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    if len(answers) == 1:
        query = f"What is the special magic number for {what} mentioned in the provided text?"
        prefix = f"The special magic number for {what} mentioned in the provided text is"
    else:
        query = f"What are all the special magic numbers for {what} mentioned in the provided text?"
        prefix = f"The special magic numbers for {what} mentioned in the provided text are"
    return Task(tuple(needles), haystack, query, answers, prefix)


def niah_single_1(rng: random.Random) -> Task:
    return _niah(rng, _filler, [_word(rng)], [[_number(rng)]], [0])


def niah_single_2(rng: random.Random) -> Task:
    return _niah(rng, _prose, [_word(rng)], [[_number(rng)]], [0])


def niah_single_3(rng: random.Random) -> Task:
    return _niah(rng, _uuid_noise, [_word(rng)], [[_uuid(rng)]], [0])


def niah_multikey_1(rng: random.Random) -> Task:
    keys = _words(rng, 4)
    return _niah(rng, _filler, keys, [[_number(rng)] for _ in keys], [0])


def niah_multikey_repeated(rng: random.Random) -> Task:
    """niah_multikey_1 in a haystack of one repeated sentence."""
    keys = _words(rng, 4)
    return _niah(rng, _repeated, keys, [[_number(rng)] for _ in keys], [0])


def niah_multikey_2(rng: random.Random) -> Task:
    key = _word(rng)
    return _niah(rng, _needle_stream(_word, _number, key), [key], [[_number(rng)]], [0])


def niah_multikey_3(rng: random.Random) -> Task:
    key = _uuid(rng)
    return _niah(rng, _needle_stream(_uuid, _uuid, key), [key], [[_uuid(rng)]], [0])


def niah_multivalue(rng: random.Random) -> Task:
    return _niah(rng, _filler, [_word(rng)], [[_number(rng) for _ in range(4)]], [0])


def niah_multiquery(rng: random.Random) -> Task:
    keys = _words(rng, 4)
    return _niah(rng, _filler, keys, [[_number(rng)] for _ in keys], [0, 1, 2, 3])


def vt(rng: random.Random) -> Task:
    """Variable tracking: a chain of assignments, each hop naming the previous variable."""
    names = [name.upper() for name in _words(rng, 5)]
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    query = f"Find all variables that are assigned the value {value} in the text above, directly or through other variables."
    return Task(tuple(chain), _filler, query, tuple(names), f"The variables assigned the value {value} are:")


def cwe(rng: random.Random) -> Task:
    """Common words: ten words recur far more often than the rest of a long list."""
    vocabulary = _words(rng, 400)
    common, rare = vocabulary[:10], vocabulary[10:]

    def stream(r: random.Random) -> Iterator[str]:
        n = 0
        while True:
            word = r.choice(common) if r.random() < 0.3 else r.choice(rare)
            n += 1
            yield f"{n}. {word}"
    query = "What are the 10 most common words in the numbered list above?"
    return Task((), stream, query, tuple(common), "The 10 most common words in the list are:")


def fwe(rng: random.Random) -> Task:
    """Frequent words: words drawn from a Zipf law; the three most frequent are asked for."""
    vocabulary = _words(rng, 200)
    weights = [1.0 / (rank + 1) ** 1.5 for rank in range(len(vocabulary))]

    def stream(r: random.Random) -> Iterator[str]:
        while True:
            yield " ".join(r.choices(vocabulary, weights, k=8)) + "."
    query = "What are the 3 most frequently appearing words in the text above?"
    return Task((), stream, query, tuple(vocabulary[:3]), "The 3 most frequent words in the text are:")


TASKS: dict[str, Callable[[random.Random], Task]] = {
    "niah_single_1": niah_single_1,
    "niah_single_2": niah_single_2,
    "niah_single_3": niah_single_3,
    "niah_multikey_1": niah_multikey_1,
    "niah_multikey_repeated": niah_multikey_repeated,
    "niah_multikey_2": niah_multikey_2,
    "niah_multikey_3": niah_multikey_3,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
}

# Tasks whose samples depend on the Python that made them (their prose is its standard
# library's): runs on different Pythons answered different documents.
PYTHON_DEPENDENT = ("niah_single_2",)


def make_sample(task_name: str, tokenizer: TextTokenizer, length: int, seed: int) -> Sample:
    """Sample `seed` of a task, exactly `length` tokens of context + query."""
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; expected one of {', '.join(TASKS)}")
    rng = random.Random(f"{task_name}:{seed}")
    task = TASKS[task_name](rng)
    head_ids, query_ids = tokenizer.frame(task.query)
    query_ids = query_ids + tokenizer.encode(task.answer_prefix)
    needles = [tokenizer.encode(" " + needle) for needle in task.needles]
    budget = length - len(head_ids) - len(query_ids) - sum(map(len, needles))
    if budget < len(needles) + 1:
        raise ValueError(f"{task_name}: {length} tokens cannot hold the prompt and its facts")
    # Haystack units up to the budget; the last one cut to fit exactly.
    units: list[list[int]] = []
    used = 0
    stream = task.haystack(rng)
    while used < budget:
        ids = tokenizer.encode(" " + next(stream))
        units.append(ids[: budget - used])
        used += len(units[-1])
    # Needles between units, at sorted random depths, in their own order.
    slots = sorted(rng.choices(range(len(units) + 1), k=len(needles)))
    body: list[int] = []
    starts: list[int] = []
    pending = list(zip(slots, needles))
    for i, unit in enumerate(units + [[]]):
        while pending and pending[0][0] == i:
            starts.append(len(head_ids) + len(body))
            body += pending.pop(0)[1]
        body += unit
    return Sample(task_name, head_ids + body, query_ids, task.query, task.answer_prefix, task.answers,
                  task.needles, tuple(starts), tokenizer.question_tokens(task.query))
