"""Flags mean the same in every command, whatever the spelling of their numbers; each
command turns them into strategy specs, the one description the factory builds from."""

from __future__ import annotations

import argparse

import pytest

from star_engine.attention.spec import StrategySpec, fraction_text, parse_fraction
from star_engine.cli import build_parser
from star_engine.commands import COMMANDS
from star_engine.flags import star_specs

REQUIRED = {"run": ["--input", "in.jsonl", "--output", "out.jsonl"]}
GRIDS = ["bench", "eval", "plan"]  # the commands that take lists of star's settings
PUBLISHED = ("--anchor-fraction", "1", "--window-fraction", "0", "--anchor-query", "off")  # star as published


def parse(command: str, *flags: str) -> argparse.Namespace:
    args = build_parser().parse_args([command, *REQUIRED.get(command, []), *flags])
    if command == "run":  # its check also wants the input file
        args.specs = star_specs(args, [args.attn])
    else:
        COMMANDS[command].check(args)
    return args


def specs(command: str, *flags: str) -> list[StrategySpec]:
    return parse(command, *flags).specs


def star(command: str, *flags: str) -> StrategySpec:
    return next(spec for spec in specs(command, *flags) if spec.attn == "star")


def flags_of(command: str) -> set[str]:
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", COMMANDS)
def test_star_layout_flags_mean_the_same_in_every_command(command):
    assert star(command, "--blocks", "3", "--anchor-fraction", "1/4", "--layout", "balanced", "--window-fraction",
                "1/4", "--window-mode", "encode") == \
        StrategySpec(blocks=3, anchor_fraction=0.25, layout="balanced", anchor_query=True, window_fraction=0.25)
    assert star(command, "--block-size", "4096", "--anchor-tokens", "1024", "--anchor-mode", "recompute",
                "--layout", "uniform", "--anchor-query", "off", "--window-tokens", "0") == \
        StrategySpec(block_size=4096, anchor_tokens=1024, anchor_mode="recompute")


@pytest.mark.parametrize("command", COMMANDS)
def test_star_puts_a_sink_the_previous_blocks_end_and_the_question_before_each_block_unless_told_otherwise(command):
    default = star(command)  # (plan compares both layouts, the uniform one first)
    assert default == StrategySpec(blocks=default.blocks, layout=default.layout, anchor_fraction=1 / 8,
                                   window_fraction=1 / 2, window_mode="pass", anchor_query=True)
    assert star(command, *PUBLISHED, "--layout", "uniform") == StrategySpec(blocks=default.blocks, anchor_fraction=1.0)


def test_a_setting_the_commands_share_has_one_spelling_wherever_it_is_offered():
    every = set(COMMANDS)
    offered_by = {
        "--lengths": {"bench", "eval", "plan"},
        "--query-tokens": {"bench", "plan"},
        "--max-new-tokens": every,
        "--tp": every - {"plan"},  # plan predicts one rank per host
        **{flag: every for flag in ("--model", "--dtype", "--blocks", "--block-size", "--anchor-tokens",
                                    "--anchor-fraction", "--layout", "--anchor-mode")},
    }
    for flag, commands in offered_by.items():
        assert {command for command in COMMANDS if flag in flags_of(command)} == commands, flag
    for other_spelling in ("--context", "--layouts", "--anchor-fractions", "--anchor-size"):
        assert not any(other_spelling in flags_of(command) for command in COMMANDS), other_spelling


@pytest.mark.parametrize("command", GRIDS)
def test_lengths_are_token_counts_in_every_command_that_takes_them(command):
    assert parse(command, "--lengths", "8K, 1M,5000").lengths == [8192, 1048576, 5000]
    with pytest.raises(ValueError, match="--lengths '8K,lots': expected token counts"):
        parse(command, "--lengths", "8K,lots")


def test_the_layout_is_balanced_unless_uniform_is_asked_for_and_a_grid_can_cross_the_two():
    assert star("run", *PUBLISHED) == StrategySpec(layout="balanced", anchor_fraction=1.0)
    assert star("run", "--layout", "uniform", *PUBLISHED) == StrategySpec(anchor_fraction=1.0)
    labels = [spec.label for spec in specs("eval", "--attn", "star", "--blocks", "4", "--layout", "uniform,balanced",
                                           *PUBLISHED)]
    assert labels == ["star 4b a=1", "star 4b a=1 balanced"]
    with pytest.raises(SystemExit):
        star("demo", "--layout", "lopsided")


def test_plan_compares_both_layouts_unless_told_which():
    assert [spec.label for spec in specs("plan")] == ["star a=1/8 pw=1/2 +q", "star a=1/8 balanced pw=1/2 +q", "ring",
                                                      "dense"]
    assert [spec.label for spec in specs("plan", "--attn", "star", "--layout", "balanced")] == \
        ["star a=1/8 balanced pw=1/2 +q"]


@pytest.mark.parametrize("command", COMMANDS)
def test_star_reads_the_question_in_phase_1_unless_told_not_to(command):
    aware, published = star(command), star(command, "--anchor-query", "off")
    assert aware.anchor_query and not published.anchor_query
    assert aware.label == published.label + " +q"


def test_how_a_number_is_written_never_changes_its_unit():
    assert star("demo", "--anchor-tokens", "1").anchor_tokens == 1  # one token
    assert star("demo", "--anchor-fraction", "1").anchor_fraction == 1.0  # the whole block
    assert star("demo", "--anchor-fraction", "1.0").anchor_fraction == 1.0
    with pytest.raises(SystemExit):  # tokens are whole numbers
        star("demo", "--anchor-tokens", "1.0")
    assert [parse_fraction(t) for t in ("1/4", "0.5", "1", "block")] == [0.25, 0.5, 1.0, 1.0]
    # and a label writes a fraction as it is typed, where it is one over a whole number
    assert [fraction_text(parse_fraction(t)) for t in ("1/8", "0.125", "1/3", "0.3", "block")] == [
        "1/8", "1/8", "1/3", "0.3", "1"]
    with pytest.raises(ValueError):
        parse_fraction("3/2")


def test_blocks_and_block_size_exclude_each_other_as_do_the_anchor_units():
    for flags in (["--blocks", "2", "--block-size", "8"], ["--anchor-tokens", "2", "--anchor-fraction", "1/2"]):
        with pytest.raises(SystemExit):
            star("demo", *flags)


@pytest.mark.parametrize("command", GRIDS)
def test_a_grid_crosses_its_lists_into_one_method_each_named_by_its_label(command):
    labels = [spec.label for spec in specs(command, "--attn", "star,dense", "--blocks", "2,4",
                                           "--anchor-fraction", "1/4,1", "--layout", "balanced", "--window-fraction",
                                           "0")]
    assert labels == ["star 2b a=1/4 balanced +q", "star 2b a=1 balanced +q", "star 4b a=1/4 balanced +q",
                      "star 4b a=1 balanced +q", "dense"]


def test_eval_cuts_the_context_into_4_blocks_unless_told_otherwise():
    assert [spec.label for spec in specs("eval")] == ["star 4b a=1/8 balanced pw=1/2 +q", "dense"]
    assert star("eval", "--block-size", "512", *PUBLISHED) == StrategySpec(block_size=512, layout="balanced",
                                                                          anchor_fraction=1.0)


def test_the_other_strategies_take_no_star_settings():
    assert specs("bench", "--attn", "ring,dense", "--blocks", "4") == [StrategySpec("ring"), StrategySpec("dense")]
    with pytest.raises(ValueError, match="ring takes no block or anchor settings"):
        StrategySpec("ring", blocks=4)


def test_each_command_has_its_default_of_new_tokens_and_query_tokens_mean_the_same():
    assert {command: parse(command).max_new_tokens for command in COMMANDS} == \
        {"run": 64, "demo": 12, "bench": 32, "eval": None, "plan": 32}  # eval: each task's own
    assert parse("eval", "--max-new-tokens", "16").max_new_tokens == 16
    assert (parse("plan", "--query-tokens", "8").query_tokens, parse("bench", "--query-tokens", "8").query_tokens) == \
        (8, 8)


@pytest.mark.parametrize("flags", [["--batch", "4"], ["--questions-per-context", "2"]])
def test_bench_refuses_the_settings_of_a_job_without_job(flags):
    with pytest.raises(ValueError, match=f"^{flags[0]} takes effect only with --job REQUESTS$"):
        parse("bench", *flags)
    job = parse("bench", "--job", "8", *flags)
    assert (job.batch, job.questions_per_context) == ((4, 1) if flags[0] == "--batch" else (1, 2))
    assert (parse("bench").batch, parse("bench").questions_per_context) == (1, 1)


def test_a_grid_crosses_window_modes_only_where_there_is_a_window():
    labels = [spec.label for spec in specs("bench", "--attn", "star", "--blocks", "4", "--anchor-fraction", "1/8",
                                           "--window-fraction", "0,1/2", "--window-mode", "encode,pass")]
    assert labels == ["star 4b a=1/8 balanced +q", "star 4b a=1/8 balanced w=1/2 +q",
                      "star 4b a=1/8 balanced pw=1/2 +q"]
    assert star("run", "--window-fraction", "0", "--anchor-query", "off") == \
        StrategySpec(layout="balanced", anchor_fraction=1 / 8)
    with pytest.raises(ValueError, match="window mode pass needs a window"):
        star("run", "--window-fraction", "0", "--window-mode", "pass")
