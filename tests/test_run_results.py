"""run's results file: a line per request, bad lines reported with their error, an
interrupted run resumed, one writer at a time."""

from __future__ import annotations

import json
import sys

from tests.jobs import TINY, good, read_jsonl, write_jsonl
from tests.launcher import job_env, star_engine


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
