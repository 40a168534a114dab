"""Errors found before the work: said once per job, in one line, whatever the launcher
and whichever ranks find them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.jobs import TINY, good, write_jsonl
from tests.launcher import mpirun, mpirun_parts, run, star_engine


def test_an_argument_error_is_said_once_per_job_not_once_per_rank(tmp_path):
    result = star_engine(["run", "--input", "x"], ranks=3)
    assert result.returncode == 2 and result.stderr.count("usage:") == 1
    directory = star_engine(["run", "--input", str(tmp_path), "--output", "o", *TINY])
    assert "--input " + str(tmp_path) + " is a directory" in directory.stderr


def errors_before_the_work(directory: Path) -> list[tuple[list[str], str]]:
    """Jobs that cannot start, each with the line that says why: (arguments, message)."""
    requests = write_jsonl(directory / "in.jsonl", [good("a")])
    broken = directory / "broken-model"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text("{not json")
    job = ["run", "--input", str(requests), "--output", str(directory / "out.jsonl"), "--model", "tiny"]
    return [
        (["run", "--input", str(directory / "nope.jsonl"), "--output", "o", "--model", "tiny"],
         f"star_engine: --input {directory / 'nope.jsonl'}: no such file"),
        (["run", "--input", str(directory), "--output", "o", "--model", "tiny"],
         f"star_engine: --input {directory} is a directory"),
        ([*job, "--model", str(directory / "no-model")], f"star_engine: --model '{directory / 'no-model'}' is neither"),
        ([*job, "--model", str(broken)], f"star_engine: {broken / 'config.json'}: not a model's config.json"),
        ([*job, "--anchor-tokens", "0"], "argument --anchor-tokens: must be >= 1, got 0"),
        ([*job, "--anchor-fraction", "abc"], "argument --anchor-fraction: 'abc' is not a fraction of the block"),
        ([*job, "--anchor-fraction", "2/1"], "argument --anchor-fraction: '2/1' is not a fraction of the block"),
        ([*job, "--block-size", "64", "--anchor-tokens", "65"],
         "star_engine: star's layout: anchor of 65 tokens exceeds the block size 64"),
    ]


def with_rank_0_late(ranks: int, command: list[str]) -> list[str]:
    """mpirun of `command` on `ranks` ranks, rank 0 starting a second after the others (as
    on a busier node)."""
    return mpirun_parts(["-np", "1", "sh", "-c", 'sleep 1; exec "$0" "$@"', *command],
                        ["-np", str(ranks - 1), *command])


@pytest.mark.parametrize("ranks", [2, 4])
def test_an_error_found_before_the_work_reaches_the_user_once_under_mpirun(tmp_path, ranks):
    """Every rank finds it; rank 0 says it; no rank leaves before its message is out (mpirun
    ends the whole job as soon as one rank leaves with an error), even where rank 0 is the
    last to find it."""
    for args, message in errors_before_the_work(tmp_path):
        result = run(with_rank_0_late(ranks, [sys.executable, "-m", "star_engine", *args]), timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count(message) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable", ["STAR_ENGINE_MPI_TIMEOUT", "STAR_ENGINE_NCCL_TIMEOUT",
                                      "STAR_ENGINE_STOP_GRACE"])
def test_a_timeout_that_is_not_seconds_is_refused_once_before_the_work_on_any_machine(tmp_path, variable):
    """Also the NCCL timeout, which only a GPU job would read."""
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    result = run([*mpirun(2), sys.executable, "-m", "star_engine", "run", "--input", str(requests), "--output",
                  str(tmp_path / "out.jsonl"), *TINY], timeout=120, env={variable: "soon"})
    assert result.returncode == 2
    assert result.stderr.count(f"star_engine: {variable}='soon': expected a number of seconds > 0") == 1, \
        result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_problem_only_some_ranks_find_is_said_once_naming_them(tmp_path):
    """As where nodes see different files: ranks 1 and 2 start in a directory without the
    requests file that rank 0's has. Rank 0 speaks for them, once."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    write_jsonl(here / "in.jsonl", [good("a")])
    command = [sys.executable, "-m", "star_engine", "run", "--input", "in.jsonl", "--output", "out.jsonl",
               "--model", "tiny"]
    result = run(mpirun_parts(["-np", "1", "-wdir", str(here), *command],
                              ["-np", "2", "-wdir", str(there), *command]), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("star_engine: ") == 1, result.stderr
    assert "star_engine: ranks 1, 2: --input in.jsonl: no such file" in result.stderr
    assert not (here / "out.jsonl").exists()


def test_a_kv_cache_beyond_the_trained_positions_or_the_memory_is_refused_in_one_line(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    out = tmp_path / "out.jsonl"
    beyond = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY, "--max-tokens", "20000"],
                         ranks=2)
    assert beyond.returncode == 2
    assert beyond.stderr.count("--max-tokens 20000 is beyond the 16384 positions tiny was trained for") == 1
    asked = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY, "--max-tokens", "20000",
                         "--beyond-trained-positions"])
    assert asked.returncode == 0, asked.stderr
    assert "warning: requests of up to 20000 tokens, beyond the 16384 positions" in asked.stderr
    huge = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY,
                        "--max-tokens", str(10**12), "--beyond-trained-positions"], ranks=2)
    assert huge.returncode == 2 and "Traceback" not in huge.stderr
    assert huge.stderr.count("a KV cache for requests of 1000000000000 tokens needs") == 1


def test_a_model_larger_than_a_rank_s_memory_is_refused_before_any_weight_is_built(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    begin = time.monotonic()
    result = star_engine(["run", "--input", str(requests), "--output", str(tmp_path / "out.jsonl"),
                          "--model", "llama-3.1-70b", "--dtype", "float32"], ranks=2)
    assert result.returncode != 0
    # 263 GiB of float32 weights: no machine that runs these tests has them free.
    assert result.stderr.count("llama-3.1-70b in float32 takes 262.8 GiB of weights on every rank,") == 1
    assert "would fit" in result.stderr  # the --tp that would, or that none would
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jsonl").exists()
    assert time.monotonic() - begin < 60


def test_a_broken_checkpoint_is_named_in_one_line(tmp_path):
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{not json")
    result = star_engine(["run", "--input", str(write_jsonl(tmp_path / "in.jsonl", [good("a")])),
                          "--output", str(tmp_path / "out.jsonl"), "--model", str(checkpoint)], ranks=2)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count(f"{checkpoint / 'config.json'}: not a model's config.json") == 1


def test_a_truncated_gguf_model_is_named_in_one_line_not_a_traceback(tmp_path):
    from star_engine.model_source import resolve

    cut = tmp_path / "model.gguf"
    with resolve("smollm2-135m-instruct").path.open("rb") as whole:
        cut.write_bytes(whole.read(1 << 20))
    result = star_engine(["run", "--input", str(write_jsonl(tmp_path / "in.jsonl", [good("a")])),
                          "--output", str(tmp_path / "out.jsonl"), "--model", str(cut)], ranks=2)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("is truncated or corrupt") == 1, result.stderr  # every rank finds it, one says it
    last = next(line for line in result.stderr.splitlines() if "truncated or corrupt" in line)
    assert last.startswith("star_engine: ") and f"{cut} is truncated or corrupt" in last
    assert "holds 1,048,576 bytes" in last and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["run", "--input", "missing.jsonl", "--output", "o.jsonl"], "--input missing.jsonl: no such file"),
    (["run", "--input", "x", "--output", "o", "--model", "nope"], "--model 'nope' is neither"),
    (["demo", "--block-size", "8", "--anchor-tokens", "9"], "anchor of 9 tokens exceeds the block size 8"),
    (["demo", "--anchor-fraction", "3/2"], "'3/2' is not a fraction of the block in (0, 1]"),
    (["run", "--input", "x", "--output", "o", "--blocks", "2", "--block-size", "8"],
     "argument --block-size: not allowed with argument --blocks"),
    (["bench", "--model", "tiny", "--attn", "star,flash"], "--attn: unknown strategies ['flash']"),
    (["bench", "--model", "tiny", "--lengths", "32K,lots"], "--lengths '32K,lots': expected token counts"),
    (["bench", "--model", "tiny", "--batch", "4"], "star_engine: --batch takes effect only with --job REQUESTS"),
    (["plan", "--model", "tiny", "--lengths", "8K", "--tp", "2"], "unrecognized arguments: --tp 2"),
])
def test_bad_arguments_are_one_clear_line_not_a_traceback(args, message):
    result = star_engine(args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
