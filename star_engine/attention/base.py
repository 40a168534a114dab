"""What an attention strategy is: how the context is laid out over the ranks and encoded.

Phase 1 (context encoding) is the strategy's own; phase 2 (query and generation) is the
same for all of them: see phase2.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from .. import _C
from ..comm import Communicator
from ..launch.control import Place
from ..model import Transformer


@dataclass(frozen=True)
class ContextLayout:
    """A strategy's layout of one context over the ranks: what each rank encodes in phase 1
    and keeps for phase 2. Strategies extend it with the details they encode from."""

    context_len: int
    kept: tuple[int, ...]  # by rank: context tokens whose K/V the rank keeps after phase 1
    encoded: tuple[int, ...]  # by rank: tokens it runs through the layers in phase 1
    received: tuple[int, ...]  # by rank: tokens whose K/V it takes from other ranks in a layer of phase 1


class Strategy(ABC):
    name: str
    reads_query = False  # whether phase 1 encodes the context knowing the request's query

    def __init__(self, place: Place, comm: Communicator | None) -> None:
        self.place, self.comm = place, comm

    @abstractmethod
    def layout(self, context_len: int) -> ContextLayout:
        """The layout of a context of context_len tokens: the one place it is worked out."""

    @abstractmethod
    def context_capacity(self, rank: int, max_context: int) -> int:
        """The most context tokens `rank` keeps for any context of up to `max_context`
        tokens: the largest layout(n).kept[rank] for n <= max_context, in closed form."""

    @abstractmethod
    def encode_context(self, model: Transformer, context_ids: Tensor, layout: ContextLayout,
                       arena: _C.KVArena, query_ids: Tensor | None = None) -> None:
        """Phase 1: fills this rank's arena with the K/V of its share of the context, as
        `layout` (this strategy's layout of context_ids) says; query_ids, only where the
        strategy reads_query and the plan lets it: the question (RequestPlan.phase1_query_tokens),
        else None."""

    def describe(self) -> str:
        return self.name
