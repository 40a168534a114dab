"""Local attention, with and without log-sum-exp, against float64 softmax."""

from __future__ import annotations

import pytest
import torch

from star_engine.attention.local import local_attention, local_attention_lse
from tests.reference import causal_visible, naive_attention


def qkv(tq: int, tk: int, heads: int = 6, kv_heads: int = 2, dim: int = 16):
    gen = torch.Generator().manual_seed(tq * 1000 + tk)
    return (torch.randn(heads, tq, dim, generator=gen), torch.randn(kv_heads, tk, dim, generator=gen),
            torch.randn(kv_heads, tk, dim, generator=gen))


@pytest.mark.parametrize("tq,tk", [(1, 50), (7, 7), (7, 40), (300, 600)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_lse_equals_float64_softmax(tq, tk, causal):
    q, k, v = qkv(tq, tk)
    o, lse = local_attention_lse(q, k, v, causal)
    want_o, want_lse = naive_attention(q, k, v, causal_visible(tq, tk) if causal else None)
    torch.testing.assert_close(o.double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq,tk", [(7, 7), (7, 40), (64, 96)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_aligns_the_causal_mask_bottom_right(tq, tk, causal):
    q, k, v = qkv(tq, tk)
    want, _ = naive_attention(q, k, v, causal_visible(tq, tk) if causal else None)
    torch.testing.assert_close(local_attention(q, k, v, causal).double(), want, atol=1e-5, rtol=1e-5)


def test_no_keys_give_zero_output_and_minus_infinite_lse():
    q, k, v = qkv(3, 0)
    o, lse = local_attention_lse(q, k, v, causal=False)
    assert torch.equal(o, torch.zeros_like(q)) and torch.isneginf(lse).all()
