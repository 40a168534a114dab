"""star_engine: long-context LLM inference over many GPUs with Star Attention, and the
Ring Attention and dense baselines through the same model code."""

__version__ = "0.1.0"
