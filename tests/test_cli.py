"""The command line: JSONL in, JSONL out, bad lines reported, interrupted runs resumed."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from star_engine.cli import build_parser
from tests.launcher import job_env, mpirun, run, start

TINY = ["--model", "tiny", "--max-new-tokens", "3"]
# Every request on every host: one group, one stream of requests, star's blocks fixed.
ALL_HOSTS = ["--hosts-per-request", "all"]


def star_engine(args: list[str], ranks: int | None = None, timeout: float = 300):
    launcher = mpirun(ranks) if ranks else []
    return run([*launcher, sys.executable, "-m", "star_engine", *args], timeout=timeout)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def good(rid, context_len: int = 120, **extra) -> dict:
    return {"id": rid, "context": "The quick brown fox jumps over the lazy dog. " * (context_len // 45 + 1),
            "query": "What did the fox do?", **extra}


def test_every_line_gets_a_result_and_bad_lines_get_their_error(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [
        good("a"),
        "this is not json",
        {"id": "b", "context": "no query here"},
        {"id": ["x"], "context": "c", "query": "q"},
        {"id": "c", "context": 42, "query": "q"},
        good("d", max_new_tokens=0),
        good("a"),
        good("long", context_len=2000),
        good(7, max_new_tokens=2),
    ])
    out = tmp_path / "out.jsonl"
    result = star_engine(["run", "--input", str(requests), "--output", str(out), "--max-tokens", "1000", *TINY])
    assert result.returncode == 0, result.stderr

    records = read_jsonl(out)
    assert len(records) == 9
    errors = {r["line"]: r["error"] for r in records if r["error"]}
    assert errors[2].startswith("not JSON")
    assert errors[3] == "missing field 'query'"
    assert errors[4] == "'id' must be a string or an integer"
    assert errors[5] == "'context' must be a string"
    assert errors[6] == "'max_new_tokens' must be an integer >= 1"
    assert errors[7] == 'duplicate id "a"'
    assert "the limit is 1000" in errors[8]
    answered = {r["id"]: r for r in records if r["error"] is None}
    assert set(answered) == {"a", 7}
    assert answered["a"]["output_tokens"] == 3 and answered[7]["output_tokens"] == 2
    a = answered["a"]
    assert isinstance(a["output"], str) and a["context_tokens"] > 100
    assert set(a["metrics"]) >= {"phase1_s", "ttft_s", "tpot_s", "peak_mem_bytes"}
    assert len(a["metrics"]["peak_mem_bytes"]) == 1 and a["metrics"]["peak_mem_bytes"][0] > 0
    assert "Traceback" not in result.stderr


def test_a_rerun_skips_the_ids_already_answered(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a"), good("b"), good("c")])
    out = tmp_path / "out.jsonl"
    # An earlier run answered "a", then died while writing "b".
    first = star_engine(["run", "--input", str(write_jsonl(tmp_path / "a.jsonl", [good("a")])),
                         "--output", str(out), *TINY])
    assert first.returncode == 0, first.stderr
    with out.open("a") as f:
        f.write('{"id": "b", "output": "cut sh')

    result = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY])
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]
    assert "2 answered, 0 failed, 1 already done" in result.stderr


def test_no_input_line_ends_the_job_and_a_rerun_reports_each_bad_line_once(tmp_path):
    requests = tmp_path / "in.jsonl"
    lines = [json.dumps(good("first")).encode(),
             b'{"id": "s", "context": "a lone \\ud800 surrogate", "query": "q?"}',
             b'{"id": "t", "context": "c", "query": "\\udfff"}',
             b"[" * 100_000 + b"]" * 100_000,
             b'{"id": ' + b"7" * 5000 + b', "context": "c", "query": "q"}',
             b'{"id": "latin-1", "context": "caf\xe9", "query": "q"}',
             json.dumps(good("a\nforged line \u001b[31m")).encode(),
             json.dumps(good("last")).encode()]
    requests.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY])
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    errors = {r["line"]: r["error"] for r in records if r["error"]}
    assert set(errors) == {2, 3, 4, 5, 6}
    assert errors[2] == "'context' is not text: a lone surrogate (\\ud800) at character 7"
    assert errors[3] == "'query' is not text: a lone surrogate (\\udfff) at character 0"
    assert errors[4] == "not JSON this program reads: nested too deeply"
    assert errors[5].startswith("not JSON: Exceeds the limit")
    assert errors[6] == "not UTF-8: byte 0xe9 at offset 33"
    assert [r["id"] for r in records if r["error"] is None] == ["first", "a\nforged line \u001b[31m", "last"]
    # Ids are printed escaped: no forged line, no terminal escape.
    assert '"a\\nforged line \\u001b[31m"' in result.stderr and "\x1b" not in result.stderr
    assert "\nforged line" not in result.stderr

    again = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY])
    assert again.returncode == 0, again.stderr
    assert read_jsonl(out) == records  # nothing repeated, nothing dropped
    assert "0 answered, 0 failed, 3 already done, 5 errors reported before" in again.stderr


def test_a_complete_last_record_is_kept_and_a_cut_one_answered_again(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a"), good("b")])
    out = tmp_path / "out.jsonl"
    assert star_engine(["run", "--input", str(requests), "--output", str(out), *TINY]).returncode == 0
    out.write_text(out.read_text().rstrip("\n"))  # complete, but without its newline
    result = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY])
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b"] and "2 already done" in result.stderr


def test_an_output_that_is_not_a_results_file_is_refused_untouched(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nabout the job")
    result = star_engine(["run", "--input", str(requests), "--output", str(notes), *TINY])
    assert result.returncode == 2
    assert "line 1 is not a result of this program; give another file" in result.stderr
    assert notes.read_text() == "my notes\nabout the job"


def test_one_run_writes_an_output_at_a_time(tmp_path):
    import fcntl

    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    out = tmp_path / "out.jsonl"
    lock = (tmp_path / ".out.jsonl.lock").open("w")
    lock.write("star_engine run, process 4242 on node7, since 2026-11-29T10:00:00")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
    result = star_engine(["run", "--input", str(requests), "--output", str(out), *TINY], ranks=2)
    assert result.returncode == 2
    assert result.stderr.count("is being written by star_engine run, process 4242 on node7") == 1
    assert not out.exists()
    lock.close()
    assert star_engine(["run", "--input", str(requests), "--output", str(out), *TINY]).returncode == 0


def test_output_dash_writes_results_to_stdout_as_they_come(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a"), good("b")])
    result = star_engine(["run", "--input", str(requests), "--output", "-", *TINY])
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a", "b"]


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
    launcher = mpirun(1)[:-2]  # mpirun --oversubscribe, then one -np per part
    return [*launcher, "-np", "1", "sh", "-c", 'sleep 1; exec "$0" "$@"', *command, ":", "-np", str(ranks - 1),
            *command]


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
    launcher = mpirun(1)[:-2]  # mpirun --oversubscribe, then one -np per directory
    result = run([*launcher, "-np", "1", "-wdir", str(here), *command, ":", "-np", "2", "-wdir", str(there),
                  *command], timeout=120)
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


@pytest.mark.parametrize("grace,ending,batch", [("30", "stopped after", "1"),
                                               ("0.2", "abandoned, a rerun does it", "1"),
                                               ("30", "stopped after", "2")])
def test_a_stop_signal_ends_the_job_with_nothing_lost_and_a_rerun_answers_the_rest(tmp_path, grace, ending, batch):
    """SIGUSR1 to mpirun reaches every rank (as Slurm's SIGTERM does under srun): the
    requests in hand are finished if the grace period allows, else abandoned; the job exits 143."""
    ids = [f"r{i}" for i in range(6)]
    requests = write_jsonl(tmp_path / "in.jsonl", [good(rid, 1500) for rid in ids])
    out = tmp_path / "out.jsonl"
    # About a second or two a request: long enough to be stopped in the middle of one.
    args = ["run", "--input", str(requests), "--output", str(out), "--model", "tiny", "--max-new-tokens", "600",
            "--batch", batch, *ALL_HOSTS]
    job = start([*mpirun(3), sys.executable, "-m", "star_engine", *args], env={"STAR_ENGINE_STOP_GRACE": grace})
    while not out.exists() or not out.read_text():
        assert job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert ending in stderr
    first = [r["id"] for r in read_jsonl(out)]  # every line whole
    assert 1 <= len(first) < len(ids)

    rerun = star_engine(args, ranks=3)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == ids  # each exactly once


@pytest.mark.parametrize("batch", ["1", "2"])
def test_a_request_unfinished_at_two_stops_in_a_row_gets_an_error_record_and_the_job_goes_on(tmp_path, batch):
    """A stop that abandons the requests in hand (they outlast STAR_ENGINE_STOP_GRACE) keeps
    their ids; the next run that stops with them in hand again writes their error records
    instead of trying them a third time, and the run after answers the rest."""
    slow = [f"slow{i}" for i in range(int(batch))]  # thousands of tokens each: they never finish in time
    requests = write_jsonl(tmp_path / "in.jsonl", [good(rid, 1500 + 100 * i, max_new_tokens=14000)
                                                   for i, rid in enumerate(slow)] + [good("quick1"), good("quick2")])
    out = tmp_path / "out.jsonl"
    args = ["run", "--input", str(requests), "--output", str(out), "--model", "tiny", "--batch", batch, *ALL_HOSTS]

    def stopped_with_the_slow_ones_in_hand() -> str:
        job = start([*mpirun(2), sys.executable, "-m", "star_engine", *args], env={"STAR_ENGINE_STOP_GRACE": "0.5"})
        in_hand = set()
        while in_hand != set(slow):  # a progress line names each request as it is handed out
            line = job.stderr.readline()
            assert line, job.communicate()
            in_hand |= {rid for rid in slow if f'"{rid}": ' in line and " context + " in line}
        job.send_signal(signal.SIGUSR1)
        _, stderr = job.communicate(timeout=120)
        assert job.returncode == 143, stderr
        assert "abandoned, a rerun does it" in stderr
        return stderr

    stopped_with_the_slow_ones_in_hand()
    assert read_jsonl(out) == []  # tried once: nothing said yet
    second = stopped_with_the_slow_ones_in_hand()
    unfinished = "not finished in two runs of the job: raise the time limit"
    assert [(r["id"], r["error"], r["line"]) for r in read_jsonl(out)] == [
        (rid, unfinished, i + 1) for i, rid in enumerate(slow)]
    assert second.count(unfinished) == len(slow)

    rest = star_engine(args, ranks=2)
    assert rest.returncode == 0, rest.stderr
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [*slow, "quick1", "quick2"]  # the slow ones not tried again
    assert all(r["error"] is None for r in records[len(slow):])


def test_star_ring_and_dense_under_mpirun(tmp_path):
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a", 300), good("b", 200)])
    outputs = {}
    for ranks, attn in [(1, "dense"), (3, "dense"), (3, "ring"), (3, "star")]:
        out = tmp_path / f"{attn}{ranks}.jsonl"
        result = star_engine(["run", "--input", str(requests), "--output", str(out), "--attn", attn,
                              "--block-size", "64", *ALL_HOSTS, *TINY], ranks=ranks)
        assert result.returncode == 0, result.stderr
        outputs[ranks, attn] = read_jsonl(out)
    # Dense and ring are exact whatever the number of ranks.
    for exact in [(3, "dense"), (3, "ring")]:
        assert [r["output"] for r in outputs[exact]] == [r["output"] for r in outputs[1, "dense"]]
    for record in outputs[3, "star"]:
        assert record["error"] is None and len(record["metrics"]["peak_mem_bytes"]) == 3


def test_requests_decoded_together_are_answered_as_one_at_a_time(tmp_path):
    doc = "The vault code is 4417. " * 12
    lines = [good("a", 300), good("b", 90, max_new_tokens=1), {"id": "c", "context": doc, "query": "The code?"},
             good("d", 200, max_new_tokens=7), {"id": "e", "context": doc, "query": "Say it twice."}, good("f", 150)]
    requests = write_jsonl(tmp_path / "in.jsonl", lines)
    outputs = {}
    for batch in ("1", "3"):
        out = tmp_path / f"batch{batch}.jsonl"
        result = star_engine(["run", "--input", str(requests), "--output", str(out), "--batch", batch, *ALL_HOSTS,
                              *TINY], ranks=3)
        assert result.returncode == 0, result.stderr
        outputs[batch] = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(outputs["3"]) == sorted(outputs["1"]) == ["a", "b", "c", "d", "e", "f"]
    for rid, alone in outputs["1"].items():
        assert outputs["3"][rid]["output"] == alone["output"]
    assert outputs["3"]["e"]["metrics"]["context_reused"]  # c's context, still in hand or copied
    assert "3 at once" in result.stderr


def test_questions_about_one_document_decode_together_in_the_memory_of_one_context(tmp_path):
    """--contexts 1 --max-tail: one arena holds the document whole, the batch's others only a
    question and its answer each, reading the document there; the answers are those of one
    request at a time, and a question whose tokens pass --max-tail gets its error line."""
    doc = "The vault code is 4417. " * 12
    questions = ["The code?", "Say it twice.", "Is it 4417?", "Which vault?", "And again?"]
    lines = [{"id": f"q{i}", "context": doc, "query": q} for i, q in enumerate(questions)]
    lines.append({"id": "long", "context": doc, "query": "Tell me everything about the vault. " * 8})
    requests = write_jsonl(tmp_path / "in.jsonl", lines)
    outputs = {}
    for name, flags in {"alone": [], "shared": ["--batch", "4", "--contexts", "1", "--max-tail", "64"]}.items():
        out = tmp_path / f"{name}.jsonl"
        result = star_engine(["run", "--input", str(requests), "--output", str(out), *flags, *ALL_HOSTS, *TINY],
                             ranks=2)
        assert result.returncode == 0, result.stderr
        outputs[name] = {r["id"]: r for r in read_jsonl(out)}
    for rid in (f"q{i}" for i in range(len(questions))):
        assert outputs["shared"][rid]["output"] == outputs["alone"][rid]["output"]
        assert outputs["shared"][rid]["metrics"]["context_reused"] == (rid != "q0")
    assert outputs["alone"]["long"]["error"] is None
    assert outputs["shared"]["long"]["error"].endswith("after the context (--max-tail)")
    refused = star_engine(["run", "--input", str(requests), "--output", str(tmp_path / "x.jsonl"), "--batch", "2",
                           "--contexts", "3", *TINY])
    assert refused.returncode != 0 and "--contexts 3 is more than --batch 2 holds" in refused.stderr


def test_questions_of_one_context_are_answered_from_one_encoding_as_if_each_came_alone(tmp_path):
    doc_a, doc_b = "The vault code is 4417. " * 12, "The ship sails at dawn. " * 12
    lines = [{"id": "a1", "context": doc_a, "query": "What is the code?"},
             {"id": "b1", "context": doc_b, "query": "When does it sail?"},
             {"id": "a2", "context": doc_a, "query": "Say the code twice."},
             {"id": "b2", "context": "another text", "context_id": "ship", "query": "Which ship?"},
             {"id": "b3", "context": doc_b, "query": "Is it at dawn?"}]
    out = tmp_path / "out.jsonl"
    result = star_engine(["run", "--input", str(write_jsonl(tmp_path / "in.jsonl", lines)), "--output", str(out),
                          *ALL_HOSTS, *TINY], ranks=2)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    # Grouped by context in the order each first appears; b2 names a context of its own.
    assert [r["id"] for r in records] == ["a1", "a2", "b1", "b3", "b2"]
    assert [r["metrics"]["context_reused"] for r in records] == [False, True, False, True, False]
    for line, record in zip([lines[0], lines[2], lines[1], lines[4], lines[3]], records):
        alone = tmp_path / f"alone_{line['id']}.jsonl"
        single = star_engine(["run", "--input", str(write_jsonl(tmp_path / f"{line['id']}.jsonl", [line])),
                              "--output", str(alone), *ALL_HOSTS, *TINY], ranks=2)
        assert single.returncode == 0, single.stderr
        assert read_jsonl(alone)[0]["output"] == record["output"]


def test_rank_0_holds_one_request_at_a_time_not_the_input_file(tmp_path):
    """Every request of a 100 MB input read, tokenized and refused (longer than --max-tokens)
    takes rank 0 no more memory than a one-document input of the same kind does."""
    from star_engine.measure.input_memory import peak_rss_bytes, write_requests

    peaks = {}
    for size in (1_000_000, 100_000_000):
        requests = tmp_path / f"in{size}.jsonl"
        ids = write_requests(requests, size, context_chars=200_000)
        out = tmp_path / f"out{size}.jsonl"
        code, peaks[size], stderr = peak_rss_bytes(
            [sys.executable, "-m", "star_engine", "run", "--input", str(requests), "--output", str(out),
             "--max-tokens", "4096", *TINY], cwd=tmp_path, env=job_env())
        assert code == 0, stderr
        records = read_jsonl(out)
        assert [r["id"] for r in records] == ids and all("the limit is 4096" in r["error"] for r in records)
        requests.unlink()
    assert peaks[100_000_000] - peaks[1_000_000] < 50 * 2**20, peaks


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
    launcher = mpirun(1)[:-2]  # mpirun --oversubscribe, then one -np per part
    result = run([*launcher, "-np", "1", *args, ":", "-np", "1", "env", f"STAR_ENGINE_CALIBRATION={odd}", *args,
                  ":", "-np", "1", *args], timeout=300)
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
    assert all(r["label"] == "star balanced +q" for r in saved["rows"] if r["attn"] == "star")  # the defaults
    assert "star balanced +q at 1024 tokens: over ring" in result.stdout


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
    assert [r["label"] for r in saved["rows"]] == ["star +q", "star balanced +q", "ring"]
    balanced = saved["rows"][1]
    assert balanced["describe"].startswith("star (block context/ranks, block 0 balanced")
    assert [s["star"] for s in saved["speedups"]] == ["star +q", "star balanced +q"]
    assert "star balanced +q at 512 tokens: over ring" in result.stdout


def test_eval_scores_every_method_on_the_same_samples(tmp_path):
    out = tmp_path / "eval.json"
    result = star_engine(["eval", "--model", "tiny", "--tasks", "niah_single_1,vt", "--lengths", "600",
                          "--samples", "2", "--blocks", "2,3", "--anchor-fraction", "1/2,1",
                          "--output", str(out)], ranks=2)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    methods = [f"star {b} a={a} balanced +q" for b in ("2b", "3b") for a in ("1/2", "1")] + ["dense"]
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


def test_a_host_of_three_ranks_splitting_the_built_in_model_answers_as_one_rank_does(tmp_path):
    """--tp 3 (the built-in model has 9 heads and 3 KV heads): one host, so the answer is
    dense attention's, with the model split three ways."""
    requests = write_jsonl(tmp_path / "in.jsonl", [{
        "id": "n", "context": "The secret number is 4721. " + "The grass is green and the sky is blue. " * 40,
        "query": "What is the secret number?"}])
    answers = {}
    for ranks, flags in ((1, ["--attn", "dense"]), (3, ["--tp", "3"])):
        out = tmp_path / f"out{ranks}.jsonl"
        result = star_engine(["run", "--input", str(requests), "--output", str(out), "--max-new-tokens", "10", *flags],
                             ranks=ranks)
        assert result.returncode == 0, result.stderr
        answers[ranks] = read_jsonl(out)[0]["output"]
    assert answers[3] == answers[1] and "4721" in answers[1]
    assert "1 host of 3" in result.stderr
