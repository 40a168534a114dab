"""Attention strategies: how the context is laid out over ranks and encoded (phase 1).

Phase 2, the same for all, is sequence_global.sequence_global_attention.
"""

from .base import Strategy
from .dense import DenseAttention
from .star import ANCHOR_MODES, StarAttention

STRATEGIES = {"star": StarAttention, "dense": DenseAttention}

__all__ = ["ANCHOR_MODES", "STRATEGIES", "DenseAttention", "StarAttention", "Strategy"]
