"""A rank's memory budget: one rule for the free memory a job needs, and one refusal that
says what to change."""

from __future__ import annotations

import pytest
import torch

import star_engine.budget as budget_module
from star_engine.budget import JobMemory, RankBudget, fits
from star_engine.config import PRESETS
from star_engine.launch.control import JobError

GIB = 1 << 30
LLAMA_8B = PRESETS["llama-3.1-8b"]  # 15.0 GiB of weights in bfloat16, 128 KiB of K/V a token


class OneRank:
    """The control plane of a job of one rank."""

    def allgather(self, obj):
        return [obj]


def refusal(free_gib: float, monkeypatch, model: str | None = "llama-3.1-8b", **job) -> str:
    monkeypatch.setattr(budget_module, "available_memory", lambda device: int(free_gib * GIB))
    with pytest.raises(JobError) as refused:
        JobMemory(LLAMA_8B, torch.bfloat16, hosts=1, **job).refuse_unless_it_fits(OneRank(), torch.device("cpu"),
                                                                                   tp=1, model=model)
    return str(refused.value)


def test_the_weights_count_as_they_are_and_the_work_beside_them_a_tenth_more_and_a_gib():
    budget = RankBudget(weights=10 * GIB, kv_cache=4 * GIB, transients=6 * GIB)
    assert budget.peak == 20 * GIB
    assert budget.needed == 10 * GIB + 11 * GIB + GIB


def test_weights_in_place_are_not_asked_for_again_and_unknown_memory_fits():
    budget = RankBudget(weights=10 * GIB, kv_cache=4 * GIB)
    assert fits(budget, budget.needed) and not fits(budget, budget.needed - 1)
    assert fits(budget, budget.needed - budget.weights, weights_in_place=True)
    assert fits(budget, None)


def test_weights_that_do_not_fit_are_refused_naming_the_tp_that_would(monkeypatch):
    assert refusal(12, monkeypatch).startswith("llama-3.1-8b in bfloat16 takes 15.0 GiB of weights on every rank, "
                                               "and a rank's cpu has 12.0 GiB free: --tp 2 (with 2 ranks) would fit")


def test_a_kv_cache_that_does_not_fit_is_refused_naming_its_flags_and_the_tp_that_would(monkeypatch):
    message = refusal(40, monkeypatch, kv_slots=2 * 131072, max_tokens=131072, batch=2)
    assert message.startswith("a KV cache for requests of 131072 tokens, 2 at once needs 32.0 GiB on every rank "
                              "(36.2 GiB with its headroom), which has 25.0 GiB free beside the weights: ")
    assert message.endswith("a smaller --max-tokens or --batch, more ranks, or --tp 2 (with 2 ranks) would fit")


def test_an_engine_whose_weights_are_in_place_is_refused_for_its_kv_cache_alone(monkeypatch):
    message = refusal(0.5, monkeypatch, model=None, kv_slots=1024, max_tokens=1024)
    assert message.startswith("a KV cache for requests of 1024 tokens needs 0.1 GiB on every rank")
    assert "which has 0.5 GiB free beside the weights: a smaller --max-tokens, more ranks" in message
