"""Attention strategies: how the context is laid out over ranks and encoded (phase 1):
star (block-local with an anchor), ring (exact, K/V around a ring), dense (one rank).
A StrategySpec names one and builds it.

Phase 2, the same for all, is phase2.py.
"""

from .base import ContextLayout, Strategy
from .dense import DenseAttention
from .ring import RingAttention
from .spec import STRATEGIES, StrategySpec
from .star import StarAttention

__all__ = ["STRATEGIES", "ContextLayout", "DenseAttention", "RingAttention", "StarAttention",
           "Strategy", "StrategySpec"]
