"""How evaluation results are summarised: mean per cell, star relative to dense."""

from __future__ import annotations

import re

import pytest

from star_engine.attention.spec import StrategySpec
from star_engine.measure.accuracy import new_tokens, summarise, table


def test_summary_averages_cells_and_relates_star_to_dense():
    rows = [{"task": "t", "length": 1024, "method": m, "score": s}
            for m, s in [("dense", 1.0), ("dense", 0.5), ("star 4b a=1", 0.5), ("star 4b a=1", 0.25)]]
    summary = {s["method"]: s for s in summarise(rows)}
    assert summary["dense"]["accuracy"] == 0.75 and summary["dense"]["samples"] == 2
    assert summary["star 4b a=1"]["relative_to_dense"] == pytest.approx(0.5)
    text = table(list(summary.values()))
    assert "0.38 (50%)" in text and "0.75" in text


def test_max_new_tokens_caps_the_tokens_each_task_generates_never_raises_them():
    tasks = ("niah_single_1", "vt", "cwe")
    assert [new_tokens(task) for task in tasks] == [32, 48, 96]  # each task's own: lists take more
    assert [new_tokens(task, 40) for task in tasks] == [32, 40, 40]


def test_a_long_evaluation_hands_over_each_cell_as_soon_as_it_is_measured():
    """So that the command line can rewrite its results file after every cell, and a stopped
    run keeps what it measured."""
    import torch

    from star_engine.checkpoint import load_model
    from star_engine.comm import make_communicator
    from star_engine.launch.launcher import init_distributed
    from star_engine.measure.accuracy import run_evaluation
    from star_engine.tokenizer import load_tokenizer

    dist = init_distributed()
    model = load_model("tiny", torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer("tiny", model.config.eos_token_ids)
    seen: list[int] = []
    said: list[str] = []
    rows = run_evaluation(model, tokenizer, make_communicator(dist, torch.device("cpu")), dist,
                          ["niah_single_1", "vt"], [300, 400], 2, [StrategySpec(blocks=2), StrategySpec("dense")], None,
                          seed=0, say=said.append, on_cell=lambda partial: seen.append(len(partial)),
                          progress_every_s=0)
    assert seen == [4, 8, 12, 16]  # 2 samples x 2 methods per (task, length), in order
    assert len(rows) == 16

    # Progress: a line inside each cell after every answer of a method but its last, and a
    # line after each cell that says how long the rest should take (but after the last).
    assert said[0].startswith("  niah_single_1 at 300 tokens, star 2b a=1: 1 of 2 samples (about ")
    assert said[1].startswith("  niah_single_1 at 300 tokens, dense: 1 of 2 samples (about ")
    cells = [line for line in said if line.startswith("[")]
    assert re.fullmatch(r"\[2/8, about \d+:\d\d:\d\d left\] niah_single_1 at 300 tokens: .*", cells[0])
    assert cells[-1].startswith("[8/8] vt at 400 tokens: ")
    assert len(cells) == 4 and len(said) == 12


def test_samples_answered_together_get_the_answers_each_gets_alone():
    import torch

    from star_engine.checkpoint import load_model
    from star_engine.comm import make_communicator
    from star_engine.launch.launcher import init_distributed
    from star_engine.measure.accuracy import run_evaluation
    from star_engine.tokenizer import load_tokenizer

    dist = init_distributed()
    model = load_model("tiny", torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer("tiny", model.config.eos_token_ids)
    comm = make_communicator(dist, torch.device("cpu"))

    def outputs(batch: int) -> dict:
        rows = run_evaluation(model, tokenizer, comm, dist, ["niah_multikey_repeated"], [400], 4,
                              [StrategySpec(blocks=3, anchor_query=True), StrategySpec("dense")],
                              None, seed=0, say=lambda line: None, batch=batch)
        return {(r["task"], r["sample"], r["method"]): r["output"] for r in rows}

    alone = outputs(1)
    assert len(alone) == 4 * 2
    assert outputs(3) == alone
