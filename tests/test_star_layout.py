"""Star's block layouts, uniform and balanced: which tokens each block holds, which rank
encodes it, and how much work that is. Pure arithmetic, one process."""

from __future__ import annotations

import math

import pytest

from star_engine.attention.star import StarAttention, block_work, first_block_tokens
from star_engine.config import PRESETS
from star_engine.costs import Calibration, token_weight
from star_engine.launch.control import Place


def star(world: int, **settings) -> StarAttention:
    return StarAttention(Place(0, world), comm=None, **settings)


def rank_work(layout, rank: int, weight: float) -> float:
    anchor = layout.anchor_size
    return sum(block_work(end - start, anchor if b else 0, weight)
               for b, (start, end) in enumerate(layout.blocks) if layout.owners[b] == rank)


def test_without_per_token_work_block_0_is_sqrt3_times_the_others_when_the_anchor_is_a_block():
    layout = star(4, layout="balanced").layout(100_000)
    first, other = (end - start for start, end in layout.blocks[:2])
    assert all(end - start == other for start, end in layout.blocks[1:])
    assert first / other == pytest.approx(math.sqrt(3), rel=1e-3)
    assert layout.anchor_size == other  # the anchor is measured in the other blocks


@pytest.mark.parametrize("world,settings", [(2, {}), (4, {}), (8, dict(anchor_fraction=0.25)),
                                            (3, dict(blocks=9)), (4, dict(block_size=5000, anchor_tokens=1000))])
def test_balanced_blocks_give_every_rank_the_same_work(world, settings):
    weight = 20_000.0  # per-token work as heavy as 20K attention pairs, about an 8B model's
    layout = star(world, layout="balanced", token_weight=weight, **settings).layout(200_000)
    blocks = [end - start for start, end in layout.blocks]
    assert sum(blocks) == 200_000 and layout.blocks[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(layout.blocks, layout.blocks[1:]))
    per_rank = [rank_work(layout, r, weight) for r in range(world)]
    per_block = block_work(blocks[1], layout.anchor_size, weight)
    if len(blocks) % world == 0 and "block_size" not in settings:
        assert max(per_rank) / min(per_rank) < 1.001  # equal but for rounding to whole tokens
    else:  # the blocks, of equal work, are dealt in numbers that differ by one at most
        assert max(per_rank) - min(per_rank) <= per_block * 1.001
    uniform = star(world, token_weight=weight, **settings).layout(200_000)
    uniform_busiest = max(rank_work(uniform, r, weight) for r in range(world))
    if "block_size" in settings:  # ten blocks a rank: a heavier block 0 changes little
        assert max(per_rank) <= uniform_busiest * 1.001
    else:  # most where each rank has one block and the anchor is a whole one
        assert max(per_rank) < uniform_busiest * (0.9 if not settings else 1)


def test_per_token_work_brings_block_0_back_towards_the_others():
    light, heavy = (star(2, layout="balanced", token_weight=w).layout(131_072) for w in (0.0, 30_000.0))
    first = [layout.blocks[0][1] for layout in (light, heavy)]
    assert first[0] > first[1] > 131_072 // 2


def test_first_block_tokens_is_the_fewest_that_do_the_work():
    for work, weight in ((1.0, 0.0), (1e6, 0.0), (1e9, 30_000.0), (12345.6, 7.5)):
        x = first_block_tokens(work, weight)
        assert block_work(x, 0, weight) >= work and (x == 1 or block_work(x - 1, 0, weight) < work)


@pytest.mark.parametrize("settings", [dict(layout="balanced"), dict(layout="balanced", blocks=7),
                                      dict(layout="balanced", block_size=9, anchor_tokens=4),
                                      dict(layout="balanced", token_weight=40.0, anchor_fraction=0.25),
                                      dict(blocks=5), dict(block_size=11)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_arena_sizing_bound_holds_every_shorter_context(world, settings):
    strategy = star(world, **settings)
    for rank in range(world):
        capacity = strategy.context_capacity(rank, 400)
        assert max(strategy.layout(n).kept[rank] for n in range(401)) <= capacity


def test_a_small_context_still_has_a_layout():
    for n in range(0, 12):
        layout = star(4, layout="balanced", token_weight=100.0).layout(n)
        assert sum(end - start for start, end in layout.blocks) == n


def test_the_shipped_calibration_weighs_a_token_of_an_8b_model_as_tens_of_thousands_of_pairs():
    weight = token_weight(PRESETS["llama-3.1-8b"], Calibration.load())
    assert 10_000 < weight < 60_000


@pytest.mark.parametrize("mode,blocks", [("broadcast", None), ("recompute", None), ("broadcast", 8)])
def test_a_rank_without_block_0_receives_the_anchor_unless_it_recomputes_it(mode, blocks):
    layout = star(4, anchor_mode=mode, blocks=blocks).layout(80_000)
    for rank in range(4):
        gets_anchor = mode == "broadcast" and 0 not in layout.blocks_of(rank)
        assert layout.received[rank] == (layout.anchor_size if gets_anchor else 0)
        recomputes = mode == "recompute" and 0 not in layout.blocks_of(rank)
        assert layout.encoded[rank] == layout.kept[rank] + (layout.anchor_size if recomputes else 0)


def test_a_window_is_encoded_before_each_block_but_the_first_and_never_reaches_into_the_anchor():
    layout = star(2, blocks=4, anchor_tokens=100, window_fraction=0.5).layout(4000)
    assert layout.window_tokens == 500  # half of a block of 1000
    assert [layout.window(b) for b in (1, 2, 3)] == [(500, 1000), (1500, 2000), (2500, 3000)]
    # Rank 0 holds blocks 0 and 1, rank 1 blocks 2 and 3: each runs its windows too.
    assert layout.encoded == (2000 + 500, 2000 + 500 + 500)
    near = star(2, blocks=4, anchor_fraction=1.0, window_tokens=300).layout(4000)
    assert near.window(1) == (1000, 1000)  # the anchor is block 1's whole past
    assert near.window(2) == (1700, 2000)


def test_a_window_passed_on_is_received_not_encoded_and_lies_within_the_previous_block():
    encoded = star(2, blocks=4, anchor_tokens=100, window_tokens=1500).layout(4000)
    passed = star(2, blocks=4, anchor_tokens=100, window_tokens=1500, window_mode="pass").layout(4000)
    assert encoded.window(2) == (500, 2000) and passed.window(2) == (1000, 2000)  # block 1 only
    assert passed.window(1) == (100, 1000)  # past the anchor
    assert passed.encoded == passed.kept == (2000, 2000)  # no window encoded again
    assert passed.received == (900, 1000 + 1000 + 100)  # the windows' K/V, and rank 1 the anchor's
    assert encoded.encoded[1] > passed.encoded[1]


def test_the_balanced_layout_weighs_a_window_by_how_it_reaches_the_block():
    """Encoded again, the window adds its tokens' work to every other block; passed on, only
    the block's attention over it: block 0 grows accordingly."""
    sizes = {mode: star(4, layout="balanced", token_weight=1000.0, anchor_fraction=0.125, window_fraction=0.5,
                        window_mode=mode).layout(65536).blocks[0][1] for mode in ("encode", "pass")}
    without = star(4, layout="balanced", token_weight=1000.0, anchor_fraction=0.125).layout(65536).blocks[0][1]
    assert without < sizes["pass"] < sizes["encode"]


def test_a_window_passed_on_lies_in_the_previous_block_wherever_that_block_is():
    """Ranks without a block hand the window on (tests/mpi checks the numbers)."""
    layout = star(4, blocks=2, anchor_tokens=10, window_tokens=80, window_mode="pass").layout(100)
    assert layout.owners == (1, 3)
    assert layout.window(1) == (10, 50)  # block 0 after the anchor, and no further back
    with pytest.raises(ValueError, match="window mode pass needs a window"):
        star(2, window_mode="pass")


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="tokens or as a fraction"):
        star(2, window_tokens=10, window_fraction=0.5)
    with pytest.raises(ValueError, match="window must be an integer"):
        star(2, window_tokens=-1)
    with pytest.raises(ValueError, match="block temperature"):
        star(2, block_temperature=0.0)
