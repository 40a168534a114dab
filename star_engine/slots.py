"""The engine's bookkeeping of its arenas: how many KV slots an arena holds on each rank, a
request's place in the engine (its arena, and the context the arena holds where another
request may reuse it), and a request that decodes with others."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import Tensor

from . import _C
from .attention.base import Strategy


def arena_capacities(strategy: Strategy, max_tokens: int, max_tail: int) -> list[int]:
    """By rank: the KV slots of an arena that holds any request of up to max_tokens tokens,
    at most max_tail of them after the context. A shorter context leaves more room for the
    tail, never more slots on the query rank than max_tokens, whatever the split."""
    place = strategy.place
    max_context = max_tokens - max_tail
    query_share = strategy.context_capacity(place.query_rank, max_context) if max_context else 0
    return [min(max_tokens, query_share + max_tail) if r == place.query_rank
            else strategy.context_capacity(r, max_tokens) for r in range(place.world)]


def context_digest(ids: Tensor, query_ids: Tensor | None = None) -> str:
    """What recognises a context's K/V: its token ids, and the query's where it was encoded
    knowing the query."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes())
    if query_ids is not None:
        digest.update(b"\0query\0" + query_ids.cpu().numpy().tobytes())
    return digest.hexdigest()


class Slot:
    """A request's place in the engine: its KV arena, and the context the arena holds
    where it may be reused (its digest and this rank's length of it)."""

    def __init__(self, arena: _C.KVArena) -> None:
        self.arena = arena
        self.encoded: tuple[str, int] | None = None

    def holds(self, digest: str) -> bool:
        return self.encoded is not None and self.encoded[0] == digest

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
