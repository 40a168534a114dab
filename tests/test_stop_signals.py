"""A stop signal (Slurm's SIGTERM before a time limit): the request in hand finished or
abandoned, nothing lost, a rerun answers the rest."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.jobs import ALL_HOSTS, good, read_jsonl, write_jsonl
from tests.launcher import mpirun, star_engine, start


@pytest.mark.parametrize("grace,ending,batch", [("30", "stopped after", "1"),
                                               ("0.2", "abandoned, a rerun does it", "1"),
                                               ("30", "stopped after", "2")])
def test_a_stop_signal_ends_the_job_with_nothing_lost_and_a_rerun_answers_the_rest(tmp_path, grace, ending, batch):
    """SIGUSR1 to mpirun reaches every rank (as Slurm's SIGTERM does under srun): the
    requests in hand are finished if the grace period allows, else abandoned; the job exits 143."""
    ids = [f"r{i}" for i in range(6)]
    requests = write_jsonl(tmp_path / "in.jsonl", [good(rid, 1500) for rid in ids])
    out = tmp_path / "out.jsonl"
    args = ["run", "--input", str(requests), "--output", str(out), "--model", "tiny", "--batch", batch, *ALL_HOSTS]
    # About a second or two a request: long enough to be stopped in the middle of one.
    job = start([*mpirun(3), sys.executable, "-m", "star_engine", *args, "--max-new-tokens", "600"],
                env={"STAR_ENGINE_STOP_GRACE": grace})
    while not out.exists() or not out.read_text():
        assert job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert ending in stderr
    first = [r["id"] for r in read_jsonl(out)]  # every line whole
    assert 1 <= len(first) < len(ids)

    rerun = star_engine([*args, "--max-new-tokens", "8"], ranks=3)  # which ids it answers, not what
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
