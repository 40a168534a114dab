"""The log-sum-exp merge of partial attention equals softmax over all the keys at once."""

from __future__ import annotations

import pytest
import torch

from star_engine import ops
from star_engine.attention.local import local_attention_lse
from tests.reference import naive_attention


def partial_results(lengths: list[int], dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, 8, generator=gen)
    keys = [torch.randn(2, n, 8, generator=gen) for n in lengths]
    values = [torch.randn(2, n, 8, generator=gen) for n in lengths]
    parts = [local_attention_lse(q.to(dtype), k.to(dtype), v.to(dtype), causal=False)
             for k, v in zip(keys, values)]
    o = torch.stack([o.reshape(-1, 8) for o, _ in parts])
    lse = torch.stack([lse.reshape(-1) for _, lse in parts])
    want_o, want_lse = naive_attention(q, torch.cat(keys, 1), torch.cat(values, 1))
    return o, lse, want_o.reshape(-1, 8), want_lse.reshape(-1)


@pytest.mark.parametrize("lengths", [[7], [3, 9, 1], [5, 0, 11, 0], [0, 4]])
def test_merge_equals_float64_softmax_over_concatenated_keys(lengths):
    o, lse, want_o, want_lse = partial_results(lengths)
    merged_o, merged_lse = ops.lse_merge(o, lse)
    torch.testing.assert_close(merged_o.double(), want_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged_lse.double(), want_lse, atol=1e-6, rtol=1e-5)


def test_partitions_without_keys_contribute_nothing_even_if_their_output_is_garbage():
    o, lse, want_o, _ = partial_results([6, 0, 4])
    o[1] = float("nan")
    merged_o, _ = ops.lse_merge(o, lse)
    torch.testing.assert_close(merged_o.double(), want_o, atol=1e-6, rtol=1e-5)


def test_rows_no_partition_covers_give_zero_and_minus_infinity():
    o = torch.randn(3, 2, 4)
    lse = torch.full((3, 2), float("-inf"))
    lse[1, 0] = 0.5
    merged_o, merged_lse = ops.lse_merge(o, lse)
    assert torch.equal(merged_o[1], torch.zeros(4)) and merged_lse[1] == float("-inf")
    torch.testing.assert_close(merged_o[0], o[1, 0])
    assert merged_lse[0] == 0.5


def test_large_log_sum_exps_do_not_overflow():
    o = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(0))
    lse = torch.tensor([[1000.0], [1001.0]])  # exp(1000) overflows float32 and float64
    merged_o, merged_lse = ops.lse_merge(o, lse)
    weights = torch.softmax(lse[:, 0].double(), dim=0)
    torch.testing.assert_close(merged_o[0].double(), weights[0] * o[0, 0].double() + weights[1] * o[1, 0].double())
    torch.testing.assert_close(merged_lse[0].double(), torch.logsumexp(lse[:, 0].double(), dim=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_are_merged_in_float32(dtype):
    o, lse, want_o, _ = partial_results([4, 6], dtype)
    merged_o, _ = ops.lse_merge(o, lse)
    assert merged_o.dtype == dtype
    torch.testing.assert_close(merged_o.double(), want_o, atol=2e-2, rtol=2e-2)


def test_parts_may_be_views_into_one_packed_buffer():
    o, lse, want_o, _ = partial_results([3, 5])
    rows, dim = o.shape[1], o.shape[2]
    packed = torch.cat([o.reshape(2, -1), lse], dim=1)  # [W, rows*dim + rows]
    merged_o, _ = ops.lse_merge(packed[:, : rows * dim].view(2, rows, dim), packed[:, rows * dim:])
    torch.testing.assert_close(merged_o.double(), want_o, atol=1e-6, rtol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(RuntimeError, match="lse_parts must be"):
        ops.lse_merge(torch.zeros(2, 3, 4), torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="float32"):
        ops.lse_merge(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.float64))
