"""Dense baseline: one rank (the query rank) encodes the whole context with causal attention.

Under several ranks the others hold no keys; in phase 2 they contribute lse = -inf, so
the answer is the single-GPU answer, computed through the same phase-2 code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C
from ..model import Transformer
from .base import ContextLayout, Strategy
from .local import local_attention


class DenseAttention(Strategy):
    name = "dense"

    def layout(self, context_len: int) -> ContextLayout:
        kept = tuple(context_len if r == self.place.query_rank else 0 for r in range(self.place.world))
        return ContextLayout(context_len, kept=kept, encoded=kept, received=(0,) * len(kept))

    def context_capacity(self, rank: int, max_context: int) -> int:
        return max_context if rank == self.place.query_rank else 0

    def encode_context(self, model: Transformer, context_ids: Tensor, layout: ContextLayout,
                       arena: _C.KVArena, query_ids: Tensor | None = None) -> None:
        if not self.place.is_query_rank or len(context_ids) == 0:
            return

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            arena.append(layer, k, v)
            return local_attention(q, k, v, causal=True)

        model(context_ids, torch.arange(len(context_ids), device=context_ids.device), attend)
