"""The engine's bookkeeping of its arenas: how many KV slots an arena holds on each rank, a
request's place in the engine (its arena, and the context the arena holds where another
request may reuse it), and a request that decodes with others.

Requests that decode together and ask about one context share its K/V: the first holds it
in its arena, and each other reads it from there, its own arena holding only its query and
the tokens it generates (its tail). So an engine may have fewer arenas of whole requests
than requests at once, the others sized for a tail alone (KVCacheSettings.contexts)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import Tensor

from . import _C
from .attention.base import Strategy
from .settings import KVCacheSettings


def arena_capacities(strategy: Strategy, max_tokens: int, max_tail: int) -> list[int]:
    """By rank: the KV slots of an arena that holds any request of up to max_tokens tokens,
    at most max_tail of them after the context. A shorter context leaves more room for the
    tail, never more slots on the query rank than max_tokens, whatever the split."""
    place = strategy.place
    max_context = max_tokens - max_tail
    query_share = strategy.context_capacity(place.query_rank, max_context) if max_context else 0
    return [min(max_tokens, query_share + max_tail) if r == place.query_rank
            else strategy.context_capacity(r, max_tokens) for r in range(place.world)]


def tail_capacities(strategy: Strategy, max_tail: int) -> list[int]:
    """By rank: the KV slots of an arena that holds only a request's tail (the query rank
    holds the tail; the others nothing)."""
    place = strategy.place
    return [max_tail if r == place.query_rank else 0 for r in range(place.world)]


def kv_cache_slots(whole: list[int], tail: list[int], cache: KVCacheSettings) -> int:
    """The KV slots of the busiest rank's arenas: cache.whole_requests arenas of `whole`
    slots by rank, and one of `tail` for each other request of the batch."""
    tails = cache.batch - cache.whole_requests
    return max(cache.whole_requests * w + tails * t for w, t in zip(whole, tail))


def contexts_at_once(batch: int, questions: int) -> int:
    """Whole arenas for a batch whose requests come `questions` to a context, in order: the
    contexts of the requests decoding, and the next one's."""
    return min(batch, -(-batch // questions) + 1)


def engine_kv_slots(strategy: Strategy, max_tokens: int, max_tail: int, cache: KVCacheSettings) -> int:
    """The KV slots of the busiest rank of an engine sized by `cache` for requests of up to
    max_tokens tokens, max_tail of them after the context."""
    return kv_cache_slots(arena_capacities(strategy, max_tokens, max_tail), tail_capacities(strategy, max_tail), cache)


def context_digest(ids: Tensor, query_ids: Tensor | None = None) -> str:
    """What recognises a context's K/V: its token ids, and the query's where it was encoded
    knowing the query."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes())
    if query_ids is not None:
        digest.update(b"\0query\0" + query_ids.cpu().numpy().tobytes())
    return digest.hexdigest()


class Slot:
    """A request's place in the engine: its KV arena, and the context the arena holds
    where it may be reused (its digest and this rank's length of it). A slot whose request
    reads another slot's context (`reads`) holds only its tail; a slot that others read
    (`readers`) keeps its context until the last of them is done. whole: whether its arena
    can hold a whole request, else only a tail."""

    def __init__(self, arena: _C.KVArena, whole: bool = True) -> None:
        self.arena, self.whole = arena, whole
        self.encoded: tuple[str, int] | None = None
        self.reads: Slot | None = None
        self.readers = 0

    def holds(self, digest: str) -> bool:
        return self.encoded is not None and self.encoded[0] == digest

    def read(self, holder: Slot) -> None:
        """This slot's next request reads holder's context; its arena holds its tail."""
        self.arena.clear()
        self.encoded, self.reads = None, holder
        holder.readers += 1

    def done_reading(self) -> None:
        if self.reads is not None:
            self.reads.readers -= 1
            self.reads = None

    @property
    def prefix(self) -> tuple[_C.KVArena, int] | None:
        """The context it reads before its own arena: (the holder's arena, this rank's length)."""
        return None if self.reads is None else (self.reads.arena, self.reads.encoded[1])

    def copy_context_to(self, other: Slot) -> None:
        """Its context's K/V into another (cleared) slot's arena: this rank's part of it, the
        same on every rank as the phase 1 that made it; also while this one decodes."""
        length = self.encoded[1]
        for layer in range(self.arena.num_layers):
            keys, values = self.arena.slots(layer)
            other.arena.append(layer, keys[:, :length], values[:, :length])
        other.encoded = self.encoded


@dataclass
class RunningRequest:
    """A request of generate_many between its first token and its last."""
    index: int
    slot: Slot
    tokens: list[int]
    position: int  # of the token fed next (its last)
    max_new_tokens: int
    eos: set[int]
    start: float
    first: float
    phase1: float
    reused: bool
    sent_before: int
    logits: list[Tensor]  # with keep_logits, on the query rank: as Generation.logits

    @property
    def done(self) -> bool:
        return self.tokens[-1] in self.eos or len(self.tokens) >= self.max_new_tokens
