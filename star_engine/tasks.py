"""Synthetic long-context tasks, generated deterministically from a seed.

A task is a long document (the context), a question about it (the query) and the
expected answer. The haystack is plain filler prose; the fact to retrieve (the needle)
sits at a chosen depth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

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

_KEYS = ("amber-falcon", "silent-harbor", "copper-lantern", "northern-orchard", "velvet-compass",
         "hollow-summit", "crimson-meadow", "distant-beacon", "quiet-glacier", "iron-willow")


@dataclass(frozen=True)
class Task:
    context: str
    query: str
    answer: str


def needle_task(count_tokens: Callable[[str], int], context_tokens: int, seed: int = 0,
                depth: float = 0.5) -> Task:
    """A document of about `context_tokens` tokens (as `count_tokens` measures) holding one
    special number at `depth` (0 = start, 1 = end), and the question that asks for it."""
    rng = random.Random(seed)
    key = rng.choice(_KEYS)
    answer = str(rng.randrange(1_000_000, 10_000_000))
    needle = f"The special magic number for {key} is {answer}."
    sentences: list[str] = []
    used = count_tokens(needle)
    while used < context_tokens:
        sentence = rng.choice(_FILLER)
        sentences.append(sentence)
        used += count_tokens(" " + sentence)
    sentences.insert(round(depth * len(sentences)), needle)
    query = (f"What is the special magic number for {key} mentioned in the text above? "
             "Answer with the number only.")
    return Task(" ".join(sentences), query, answer)
