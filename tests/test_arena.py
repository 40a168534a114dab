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
    assert not (a.slots(1)[0] == 9.0).any()


def one_token(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    return kv(1, value)


def test_decoding_counts_on_the_device_and_hands_the_length_back():
    a = arena(6)
    for layer in range(3):
        a.append(layer, *kv(2, 1.0))
    a.start_decoding()
    assert a.decoding and a.device_length.dtype == torch.int32 and int(a.device_length) == 2
    for step in (3.0, 4.0):
        a.add_token()
        for layer in range(3):
            a.write_token(layer, *one_token(step))
    a.finish_decoding()
    assert [a.length(layer) for layer in range(3)] == [4, 4, 4]
    assert torch.equal(a.keys(1)[:, 2:], torch.cat([torch.full((2, 1, 4), 3.0), torch.full((2, 1, 4), 4.0)], 1))
    assert torch.equal(a.values(2)[:, 3], torch.full((2, 4), -4.0))


def test_a_rank_that_stores_no_new_token_keeps_its_length_while_decoding():
    a = arena(6)
    for layer in range(3):
        a.append(layer, *kv(5))
    a.start_decoding()
    a.finish_decoding()
    assert a.length(0) == 5


def test_while_decoding_the_host_length_is_not_read_nor_appended_to():
    a = arena()
    a.start_decoding()
    for call in (lambda: a.length(0), lambda: a.keys(0), lambda: a.append(0, *kv(1)), a.start_decoding):
        with pytest.raises(RuntimeError, match="finish_decoding"):
            call()
    a.finish_decoding()
    with pytest.raises(RuntimeError, match="start_decoding"):
        a.write_token(0, *one_token(1.0))


def test_decoding_starts_only_between_passes_through_every_layer():
    a = arena()
    a.append(0, *kv(2))
    with pytest.raises(RuntimeError, match="layers hold 0 to 2 tokens"):
        a.start_decoding()


def test_decoding_past_capacity_writes_nothing_and_is_reported():
    a = arena(2)
    for layer in range(3):
        a.append(layer, *kv(2, 1.0))
    a.start_decoding()
    a.add_token()
    with pytest.raises(_C.ArenaFullError, match="no slot 2 of 2"):
        a.write_token(0, *one_token(9.0))
    with pytest.raises(_C.ArenaFullError, match="decoding reached 3 tokens, the arena holds 2"):
        a.finish_decoding()
    assert not any((a.slots(layer)[0] == 9.0).any() for layer in range(3))


def test_truncate_goes_back_to_an_encoded_context():
    a = arena()
    for layer in range(3):
        a.append(layer, *kv(4, 1.0))
        a.append(layer, *kv(2, 2.0))  # a question's tokens after the context
    a.truncate(4)
    assert [a.length(layer) for layer in range(3)] == [4, 4, 4]
    assert torch.equal(a.keys(0), torch.full((2, 4, 4), 1.0))
    with pytest.raises(RuntimeError, match="cannot keep 5"):
        a.truncate(5)


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
