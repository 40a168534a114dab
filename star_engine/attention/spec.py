"""One description of a strategy, and the one factory that builds it: what every command
turns its flags into, what results files record, what the evaluation's rows are named by.
Without PyTorch until a strategy is built, so that a job's settings are checked at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..costs import Calibration, token_weight
from ..names import (ANCHOR_MODES, DEFAULT_ANCHOR_MODE, PUBLISHED_STAR_LAYOUT, PUBLISHED_WINDOW_MODE, STAR_LAYOUTS,
                     STRATEGIES, WINDOW_MODES)

if TYPE_CHECKING:
    from ..comm import Communicator
    from ..config import ModelConfig
    from ..launch.control import Place
    from .base import Strategy


@dataclass(frozen=True)
class StrategySpec:
    """A strategy and, for star, its layout: blocks of block_size tokens or `blocks` of them
    (default: one per rank); an anchor of anchor_tokens or anchor_fraction of a block
    (default: the whole block); the anchor's K/V broadcast or recomputed; blocks of equal
    size (uniform) or a longer block 0 that makes their work equal (balanced). These defaults
    are the algorithm as published; the commands' default layout is names.DEFAULT_STAR_LAYOUT.
    window_tokens and anchor_query: what else precedes a block in phase 1, and window_mode
    where the window's K/V comes from (encoded again, or passed on); block_temperature:
    phase 2's temperature of the blocks encoded after the anchor; recompute_fraction: the
    share of the tokens outside block 0 whose K/V is recomputed after phase 1 (star.py).
    ValueError, naming the setting, unless the settings make a layout."""

    attn: str = "star"
    block_size: int | None = None
    blocks: int | None = None
    anchor_tokens: int | None = None
    anchor_fraction: float | None = None
    anchor_mode: str = DEFAULT_ANCHOR_MODE
    layout: str = PUBLISHED_STAR_LAYOUT
    window_tokens: int = 0
    window_fraction: float | None = None
    window_mode: str = PUBLISHED_WINDOW_MODE
    anchor_query: bool = False
    block_temperature: float = 1.0
    recompute_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.attn not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.attn!r}: expected one of {', '.join(STRATEGIES)}")
        star_settings = (self.block_size, self.blocks, self.anchor_tokens, self.anchor_fraction)
        if self.attn != "star" and (any(v is not None for v in star_settings) or self.anchor_mode != DEFAULT_ANCHOR_MODE
                                    or self.layout != PUBLISHED_STAR_LAYOUT or self.window_tokens
                                    or self.window_fraction is not None or self.window_mode != PUBLISHED_WINDOW_MODE
                                    or self.anchor_query or self.block_temperature != 1.0
                                    or self.recompute_fraction):
            raise ValueError(f"{self.attn} takes no block or anchor settings (they are star's)")
        check_star_settings(self.block_size, self.blocks, self.anchor_tokens, self.anchor_fraction,
                            self.anchor_mode, self.layout, self.window_tokens, self.window_fraction,
                            self.block_temperature, self.recompute_fraction, self.window_mode)

    def build(self, place: Place, comm: Communicator | None, config: ModelConfig,
              calibration: Calibration | None) -> Strategy:
        """The strategy, for a model of this shape: a balanced layout weighs its blocks by
        the model's work on the device of `calibration` (the job's, the same on every rank;
        other layouts need none)."""
        from .dense import DenseAttention
        from .ring import RingAttention
        from .star import StarAttention

        if self.attn != "star":
            return {"ring": RingAttention, "dense": DenseAttention}[self.attn](place, comm)
        if self.layout == "balanced" and calibration is None:
            raise ValueError("the balanced layout weighs its blocks by a calibration, and none was given")
        weight = token_weight(config, calibration) if self.layout == "balanced" else 0.0
        return StarAttention(place, comm, block_size=self.block_size, blocks=self.blocks,
                             anchor_tokens=self.anchor_tokens, anchor_fraction=self.anchor_fraction,
                             anchor_mode=self.anchor_mode, layout=self.layout, token_weight=weight,
                             window_tokens=self.window_tokens, window_fraction=self.window_fraction,
                             window_mode=self.window_mode, anchor_query=self.anchor_query,
                             block_temperature=self.block_temperature,
                             recompute_fraction=self.recompute_fraction)

    @property
    def label(self) -> str:
        """Short and unique among specs: "dense", "ring", "star", "star 4b a=1/4",
        "star block=4096 a=512t", "star 4b a=64t w=256t +q T=1.1", "star 4b r=0.1"; a window
        passed on rather than encoded again is "pw=" ("star 4b a=1/8 pw=1/2")."""
        if self.attn != "star":
            return self.attn
        parts = ["star"]
        if self.blocks is not None:
            parts.append(f"{self.blocks}b")
        if self.block_size is not None:
            parts.append(f"block={self.block_size}")
        if self.anchor_tokens is not None:
            parts.append(f"a={self.anchor_tokens}t")
        elif self.anchor_fraction is not None or len(parts) > 1:
            parts.append(f"a={fraction_text(self.anchor_fraction or 1.0)}")
        if self.anchor_mode != DEFAULT_ANCHOR_MODE:
            parts.append(self.anchor_mode)
        if self.layout != PUBLISHED_STAR_LAYOUT:
            parts.append(self.layout)
        window = "pw" if self.window_mode == "pass" else "w"
        if self.window_tokens:
            parts.append(f"{window}={self.window_tokens}t")
        if self.window_fraction is not None:
            parts.append(f"{window}={fraction_text(self.window_fraction)}")
        if self.anchor_query:
            parts.append("+q")
        if self.block_temperature != 1.0:
            parts.append(f"T={self.block_temperature:g}")
        if self.recompute_fraction:
            parts.append(f"r={self.recompute_fraction:g}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        """The settings that differ from the defaults, for results files."""
        return {k: v for k, v in asdict(self).items() if v != getattr(StrategySpec, k, None) or k == "attn"}


def check_star_settings(block_size: int | None, blocks: int | None, anchor_tokens: int | None,
                        anchor_fraction: float | None, anchor_mode: str, layout: str = PUBLISHED_STAR_LAYOUT,
                        window_tokens: int = 0, window_fraction: float | None = None,
                        block_temperature: float = 1.0, recompute_fraction: float = 0.0,
                        window_mode: str = PUBLISHED_WINDOW_MODE) -> None:
    """Raises ValueError, naming the setting, unless the settings make a layout."""
    if block_size is not None and blocks is not None:
        raise ValueError("give the block size in tokens or the number of blocks, not both")
    if anchor_tokens is not None and anchor_fraction is not None:
        raise ValueError("give the anchor in tokens or as a fraction of the block, not both")
    for name, value in (("block size", block_size), ("number of blocks", blocks), ("anchor", anchor_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if anchor_fraction is not None and not 0 < anchor_fraction <= 1:
        raise ValueError(f"anchor as a fraction of the block must be in (0, 1], got {anchor_fraction}")
    if anchor_tokens is not None and block_size is not None and anchor_tokens > block_size:
        raise ValueError(f"anchor of {anchor_tokens} tokens exceeds the block size {block_size}")
    if anchor_mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode must be one of {', '.join(ANCHOR_MODES)}, got {anchor_mode!r}")
    if layout not in STAR_LAYOUTS:
        raise ValueError(f"star layout must be one of {', '.join(STAR_LAYOUTS)}, got {layout!r}")
    if not isinstance(window_tokens, int) or isinstance(window_tokens, bool) or window_tokens < 0:
        raise ValueError(f"window must be an integer >= 0 (tokens), got {window_tokens!r}")
    if window_fraction is not None and window_tokens:
        raise ValueError("give the window in tokens or as a fraction of the block, not both")
    if window_fraction is not None and not 0 < window_fraction <= 1:
        raise ValueError(f"window as a fraction of the block must be in (0, 1], got {window_fraction}")
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window mode must be one of {', '.join(WINDOW_MODES)}, got {window_mode!r}")
    if window_mode != PUBLISHED_WINDOW_MODE and not window_tokens and window_fraction is None:
        raise ValueError(f"window mode {window_mode} needs a window (--window-tokens or --window-fraction)")
    if not block_temperature > 0 or block_temperature == float("inf"):
        raise ValueError(f"block temperature must be a number > 0, got {block_temperature!r}")
    if not 0 <= recompute_fraction <= 1:
        raise ValueError(f"the recompute fraction must be in [0, 1], got {recompute_fraction!r}")
    if recompute_fraction and block_temperature != 1.0:
        raise ValueError("the recompute reads the keys as phase 1 wrote them, which a block temperature changes: "
                         "give one of the two")


def fraction_text(value: float) -> str:
    """1.0 -> '1', 1/n for n up to 64 as '1/n' (as --anchor-fraction takes it), else as %g."""
    if abs(value - 1.0) < 1e-9:
        return "1"
    n = round(1 / value)
    return f"1/{n}" if 1 < n <= 64 and abs(value * n - 1) < 1e-9 else f"{value:g}"


def parse_fraction(text: str) -> float:
    """'1/4', '0.5', '1' or 'block' (= 1): a fraction of the block, in (0, 1]."""
    text = text.strip()
    if text == "block":
        return 1.0
    try:
        num, _, den = text.partition("/")
        value = int(num) / int(den) if den else float(text)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"{text!r} is not a fraction of the block in (0, 1] (such as 1/4, 0.5, 1)")
    return value
