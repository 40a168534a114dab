"""Attention strategies: how the context is laid out over ranks and encoded (phase 1):
star (block-local with an anchor), ring (exact, K/V around a ring), dense (one rank).

Phase 2, the same for all, is sequence_global.sequence_global_attention.
"""

from .base import Strategy
from .dense import DenseAttention
from .ring import RingAttention
from .star import ANCHOR_MODES, StarAttention

STRATEGIES = {"star": StarAttention, "ring": RingAttention, "dense": DenseAttention}

__all__ = ["ANCHOR_MODES", "STRATEGIES", "DenseAttention", "RingAttention", "StarAttention", "Strategy"]
