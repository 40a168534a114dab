"""The KV arena: one allocation, per-layer views, appends that can never overflow."""

from __future__ import annotations

import pytest
import torch

from star_engine import _C


def arena(capacity: int = 10) -> _C.KVArena:
    return _C.KVArena(3, 2, 4, capacity, torch.float32, torch.device("cpu"))


def kv(n: int, value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((2, n, 4), value), torch.full((2, n, 4), -value)


def test_one_allocation_sized_from_the_plan():
    a = arena(10)
    assert a.nbytes == 3 * 2 * 2 * 10 * 4 * 4  # layers x {K,V} x heads x capacity x dim x fp32
    assert a.capacity == 10 and a.num_layers == 3


def test_appends_accumulate_per_layer_and_views_show_them():
    a = arena()
    a.append(0, *kv(3, 1.0))
    a.append(0, *kv(2, 2.0))
    a.append(2, *kv(4, 5.0))
    assert [a.length(i) for i in range(3)] == [5, 0, 4]
    assert a.keys(0).shape == (2, 5, 4)
    assert torch.equal(a.keys(0)[:, 3:], torch.full((2, 2, 4), 2.0))
    assert torch.equal(a.values(2), torch.full((2, 4, 4), -5.0))
    assert a.keys(1).shape == (2, 0, 4)


def test_an_append_past_capacity_is_refused_and_writes_nothing():
    a = arena(6)
    a.append(1, *kv(4, 1.0))
    with pytest.raises(_C.ArenaFullError, match="cannot append 3"):
        a.append(1, *kv(3, 9.0))
    assert a.length(1) == 4
    assert not (a.storage == 9.0).any()


def test_check_fits_refuses_before_any_compute():
    a = arena(6)
    a.check_fits(6)
    a.append(0, *kv(2))
    a.check_fits(4)
    with pytest.raises(_C.ArenaFullError, match="5 more tokens needed, 4 of 6 slots free"):
        a.check_fits(5)


def test_clear_forgets_keys_but_keeps_the_memory():
    a = arena()
    a.append(0, *kv(5))
    a.clear()
    assert a.length(0) == 0 and a.nbytes == 3 * 2 * 2 * 10 * 4 * 4


def test_bad_layers_and_shapes_are_refused():
    a = arena()
    with pytest.raises(IndexError):
        a.keys(3)
    with pytest.raises(RuntimeError, match=r"expected \[2, n, 4\]"):
        a.append(0, torch.zeros(3, 1, 4), torch.zeros(3, 1, 4))
    with pytest.raises(RuntimeError, match="k has 2 tokens, v has 1"):
        a.append(0, torch.zeros(2, 2, 4), torch.zeros(2, 1, 4))
