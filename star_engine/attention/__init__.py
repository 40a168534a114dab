"""Attention strategies: how the context is laid out over ranks and encoded (phase 1):
star (block-local with an anchor, star.py), ring (exact, K/V around a ring, ring.py), dense
(one rank, dense.py). A StrategySpec (spec.py) names one and builds it. Phase 2, the same
for all, is phase2.py; the kernels a rank attends its own keys with, local.py and
decode.py.
"""
