"""What an attention strategy is: how the context is laid out over the ranks and encoded.

Phase 1 (context encoding) is the strategy's own; phase 2 (query and generation) is the
same for all of them: see sequence_global.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch import Dist
from ..model import Transformer


class Strategy(ABC):
    name: str

    def __init__(self, dist: Dist, comm: Communicator) -> None:
        self.dist, self.comm = dist, comm

    @abstractmethod
    def context_split(self, context_len: int) -> list[int]:
        """How many context tokens' K/V each rank keeps after phase 1, by rank."""

    @abstractmethod
    def context_capacity(self, rank: int, max_context: int) -> int:
        """The most context tokens `rank` keeps for any context of up to `max_context`
        tokens (the engine adds the query rank's room for the query and generated tokens)."""

    @abstractmethod
    def encode_context(self, model: Transformer, context_ids: Tensor, arena: _C.KVArena) -> None:
        """Phase 1: fills this rank's arena with the K/V of its share of the context."""

    def describe(self) -> str:
        return self.name
