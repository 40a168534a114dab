"""Each command end to end: demo, bench, eval, plan; rank 0's settings for all ranks; the
help."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from star_engine.cli import build_parser
from tests.jobs import TINY, good, read_jsonl, write_jsonl
from tests.launcher import mpirun_parts, run, star_engine


def test_demo_prints_both_answers_side_by_side():
    result = star_engine(["demo", "--model", "tiny", "--context-tokens", "400", "--max-new-tokens", "2"], ranks=2)
    assert result.returncode == 0, result.stderr
    assert "star (2 ranks)" in result.stdout and "dense (2 ranks)" in result.stdout
    assert "first token (s)" in result.stdout


def jobs_of_every_command(directory: Path) -> dict[str, list[str]]:
    """A small job of each command on the tiny preset, star in its balanced layout."""
    requests = write_jsonl(directory / "in.jsonl", [good("a", 400), good("b", 900)])
    return {
        "run": ["run", "--input", str(requests), "--output", str(directory / "out.jsonl"), *TINY],
        "demo": ["demo", "--model", "tiny", "--context-tokens", "600", "--max-new-tokens", "2"],
        "eval": ["eval", "--model", "tiny", "--tasks", "niah_single_1", "--lengths", "700", "--samples", "1",
                 "--output", str(directory / "eval.json")],
        "bench": ["bench", "--model", "tiny", "--attn", "star", "--lengths", "700", "--max-new-tokens", "2",
                  "--query-tokens", "8", "--output", str(directory / "bench.json")],
        "bench --job": ["bench", "--model", "tiny", "--attn", "star", "--lengths", "700", "--job", "2",
                        "--max-new-tokens", "2", "--query-tokens", "8", "--output", str(directory / "job.json")],
        "plan": ["plan", "--model", "tiny", "--lengths", "8K", "--gpus", "3"],
        "plan --calibrate": ["plan", "--calibrate", "--model", "tiny", "--output", str(directory / "rates.json")],
    }


@pytest.mark.parametrize("command", ["run", "demo", "eval", "bench", "bench --job", "plan",
                                     pytest.param("plan --calibrate", marks=pytest.mark.alone)])
def test_every_command_runs_on_rank_0_s_settings_when_a_rank_sees_others(tmp_path, command):
    """mpirun hands no environment to other nodes unless told to: here rank 1 alone is given
    a calibration (its balanced blocks would differ). Every rank computes with rank 0's, and
    rank 0 says once that rank 1's view differs."""
    rates = json.loads((Path(__import__("star_engine").__file__).parent / "calibrations" / "nvidia-h200.json")
                       .read_text())
    odd = tmp_path / "odd-calibration.json"
    odd.write_text(json.dumps({**rates, "attention_flops_per_s": rates["attention_flops_per_s"] / 1000}))
    args = [sys.executable, "-m", "star_engine", *jobs_of_every_command(tmp_path)[command]]
    result = run(mpirun_parts(["-np", "1", *args], ["-np", "1", "env", f"STAR_ENGINE_CALIBRATION={odd}", *args],
                              ["-np", "1", *args]), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("note: STAR_ENGINE_CALIBRATION differs on rank 1; every rank uses rank 0's "
                               "(unset)") == 1, result.stderr[-4000:]
    if command == "run":
        alike = star_engine([*jobs_of_every_command(tmp_path)["run"][:4], str(tmp_path / "alike.jsonl"), *TINY],
                            ranks=3)
        assert alike.returncode == 0, alike.stderr[-4000:]
        assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == \
            [r["output"] for r in read_jsonl(tmp_path / "alike.jsonl")]


def test_help_answers_without_loading_pytorch():
    probe = ("import sys\nfrom star_engine.cli import build_parser\n"
             "build_parser().format_help()\nassert 'torch' not in sys.modules, 'torch was imported'")
    result = run([sys.executable, "-c", probe], timeout=60)
    assert result.returncode == 0, result.stderr


def test_help_documents_every_flag():
    parser = build_parser()
    for command in ("run", "demo", "bench", "eval", "plan"):
        sub = parser._subparsers._group_actions[0].choices[command]
        help_text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
            for flag in action.option_strings:
                assert flag in help_text


def test_bench_runs_every_strategy_at_every_length_and_saves_json_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    result = star_engine(["bench", "--model", "tiny", "--lengths", "256,1K", "--max-new-tokens", "3",
                          "--query-tokens", "8", "--output", str(out)], ranks=2)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["ranks"] == 2 and saved["model"] == "tiny" and saved["commit"] and saved["complete"]
    assert saved["cpu"]["model"] and saved["cpu"]["threads"] >= 1 and saved["python"].count(".") == 2
    assert [(r["attn"], r["context"]) for r in saved["rows"]] == [
        (attn, n) for attn in ("star", "ring", "dense") for n in (256, 1024)]
    for row in saved["rows"]:
        assert row["output_tokens"] == 3 and row["ttft_s"] >= row["phase1_s"] > 0
        assert len(row["peak_mem_bytes"]) == 2 and len(row["bytes_sent"]) == 2
    ring = next(r for r in saved["rows"] if r["attn"] == "ring" and r["context"] == 1024)
    assert min(ring["bytes_sent"]) > 0  # K/V went around the ring
    assert [s["context"] for s in saved["speedups"]] == [256, 1024]
    assert out.with_suffix(".png").stat().st_size > 10_000
    stars = [r["label"] for r in saved["rows"] if r["attn"] == "star"]
    assert set(stars) == {"star a=1/8 balanced pw=1/2 +q"}  # the defaults
    assert "star a=1/8 balanced pw=1/2 +q at 1024 tokens: over ring" in result.stdout


def test_bench_measures_a_job_one_at_a_time_and_batched_with_contexts_shared_and_copied(tmp_path):
    out = tmp_path / "job.json"
    result = star_engine(["bench", "--model", "tiny", "--attn", "star", "--lengths", "2K", "--job", "4",
                          "--questions-per-context", "2", "--max-new-tokens", "3", "--query-tokens", "8",
                          "--batch", "4", "--output", str(out)], ranks=2)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["one at a time, context once", "batch 4", "batch 4, copies"]
    for row in rows:
        assert row["requests"] == 4 and len(row["ttft_s"]) == len(row["latency_s"]) == 4
        assert row["requests_per_hour"] > 0 and row["output_tokens_per_s"] > 0
        assert row["context_reused"] == [False, True, False, True]  # a context's second question skips phase 1
    assert rows[0]["latency_s"] == sorted(rows[0]["latency_s"])
    assert rows[1]["contexts_held"] == 3  # two decoding, and the next; their questions read them there
    assert rows[2]["contexts_held"] == 4  # each request holds a copy
    assert "batch 4, copies" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    out.with_suffix(".png").unlink()
    replot = star_engine(["bench", "--replot", str(out)])
    assert replot.returncode == 0, replot.stderr
    assert out.with_suffix(".png").exists()


def test_bench_results_of_other_star_layouts_get_names_of_their_own():
    from star_engine.attention.spec import StrategySpec
    from star_engine.commands.bench import bench_name

    def star(**settings) -> StrategySpec:  # as the command line makes it
        return StrategySpec(**{"layout": "balanced", **settings})

    assert bench_name("llama-3.1-8b", 8, []) == "e2e_llama-3.1-8b_8ranks"
    assert bench_name("llama-3.1-8b", 8, [star()]) == "e2e_llama-3.1-8b_8ranks"
    assert bench_name("llama-3.1-8b", 8, [star(anchor_fraction=0.25)]) == "e2e_llama-3.1-8b_8ranks_anchor0.25"
    assert (bench_name("tiny", 2, [star(block_size=4096, anchor_tokens=1024)])
            == "e2e_tiny_2ranks_block4096_anchortokens1024")
    assert bench_name("tiny", 2, [star(blocks=8)]) == "e2e_tiny_2ranks_blocks8"
    assert bench_name("tiny", 2, [star(layout="uniform")]) == "e2e_tiny_2ranks_uniform"
    assert bench_name("tiny", 2, [star(layout="uniform"), star()]) == "e2e_tiny_2ranks_layouts"


def test_bench_measures_several_star_layouts_against_ring_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    result = star_engine(["bench", "--model", "tiny", "--attn", "star,ring", "--layout", "uniform,balanced",
                          "--lengths", "512", "--max-new-tokens", "2", "--query-tokens", "4", "--output", str(out)],
                         ranks=2)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["rows"]] == ["star a=1/8 pw=1/2 +q", "star a=1/8 balanced pw=1/2 +q", "ring"]
    balanced = saved["rows"][1]
    assert balanced["describe"].startswith("star (block context/ranks, block 0 balanced")
    assert [s["star"] for s in saved["speedups"]] == ["star a=1/8 pw=1/2 +q", "star a=1/8 balanced pw=1/2 +q"]
    assert "star a=1/8 balanced pw=1/2 +q at 512 tokens: over ring" in result.stdout


def test_eval_scores_every_method_on_the_same_samples(tmp_path):
    out = tmp_path / "eval.json"
    result = star_engine(["eval", "--model", "tiny", "--tasks", "niah_single_1,vt", "--lengths", "600",
                          "--samples", "2", "--blocks", "2,3", "--anchor-fraction", "1/2,1",
                          "--output", str(out)], ranks=2)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    methods = [f"star {b} a={a} balanced pw=1/2 +q" for b in ("2b", "3b") for a in ("1/2", "1")] + ["dense"]
    assert saved["complete"] is True and len(saved["rows"]) == 2 * 2 * len(methods)
    for task in ("niah_single_1", "vt"):
        for sample in (0, 1):
            answered = [r["method"] for r in saved["rows"] if r["task"] == task and r["sample"] == sample]
            assert answered == methods
    assert {(s["task"], s["method"]) for s in saved["summary"]} == {
        (t, m) for t in ("niah_single_1", "vt") for m in methods}
    assert all(s["samples"] == 2 and 0 <= s["accuracy"] <= 1 for s in saved["summary"])
    assert out.with_suffix(".png").exists()
    assert "dense" in result.stdout.splitlines()[0]
    assert result.stdout.strip() in out.with_suffix(".txt").read_text()


def test_a_resumed_eval_keeps_the_cells_already_measured_and_measures_the_rest(tmp_path):
    out = tmp_path / "eval.json"
    common = ["eval", "--model", "tiny", "--lengths", "600", "--samples", "2", "--blocks", "2", "--output", str(out)]
    first = star_engine([*common, "--tasks", "niah_single_1"], ranks=2)
    assert first.returncode == 0, first.stderr
    before = json.loads(out.read_text())

    resumed = star_engine([*common, "--tasks", "niah_single_1,vt", "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 1 (task, length) cells" in resumed.stderr
    assert "niah_single_1 at 600" not in resumed.stderr  # not measured again
    after = json.loads(out.read_text())
    assert after["complete"] and [r for r in after["rows"] if r["task"] == "niah_single_1"] == before["rows"]
    assert len([r for r in after["rows"] if r["task"] == "vt"]) == 2 * 2
    assert [run["commit"] for run in after["earlier_runs"]] == [before["commit"]]

    # A resumed run that asks for less keeps the rest of the file.
    fewer = star_engine([*common, "--tasks", "vt", "--resume"], ranks=2)
    assert fewer.returncode == 0, fewer.stderr
    assert json.loads(out.read_text())["rows"] == after["rows"]

    other = star_engine([*common[:-4], "--samples", "3", "--output", str(out), "--resume"], ranks=2)
    assert other.returncode != 0
    assert "has samples_per_cell 2, this run 3" in other.stderr
    capped = star_engine([*common, "--tasks", "vt", "--max-new-tokens", "8", "--resume"], ranks=2)
    assert capped.returncode != 0
    assert "has max_new_tokens None, this run 8" in capped.stderr
