"""The output of `run`: one run writes it at a time, and what stops a run from writing it
is said in one line, naming the file or its directory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from star_engine.answer_file import AnswerFile, AnswerFileError, check_answer_file
from star_engine.cli import main
from tests.jobs import good, write_jsonl


def flock_failing_with(code: int):
    def flock(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))
    return flock


def test_a_lock_held_by_another_process_names_the_holder(tmp_path, monkeypatch):
    (tmp_path / ".out.jsonl.lock").write_text("star_engine run, process 4242 on node7")
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.EWOULDBLOCK))
    with pytest.raises(AnswerFileError, match="is being written by star_engine run, process 4242 on node7"):
        check_answer_file(tmp_path / "out.jsonl")


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL],
                         ids=errno.errorcode.get)
def test_a_file_system_without_locks_is_said_to_be_one_with_the_way_to_run_without_the_lock(
        tmp_path, monkeypatch, code):
    """Lustre mounted without -o flock, some NFS: flock fails for want of locks, not because
    another run holds one."""
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(code))
    with pytest.raises(AnswerFileError) as refused:
        check_answer_file(tmp_path / "out.jsonl")
    message = str(refused.value)
    assert "being written" not in message
    assert message.startswith(f"--output {tmp_path / 'out.jsonl'}: the file system of {tmp_path} does not lock "
                              f"files ({os.strerror(code)})")
    assert "STAR_ENGINE_NO_LOCK=1" in message


def test_without_the_lock_the_output_is_written_where_locks_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.ENOLCK))
    monkeypatch.setenv("STAR_ENGINE_NO_LOCK", "1")
    out = tmp_path / "out.jsonl"
    check_answer_file(out)
    answers = AnswerFile(out, threading.RLock())
    answers.write_error(1, "0123456789abcdef", "a", "an error")
    answers.close()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
    assert not (tmp_path / ".out.jsonl.lock").exists()


def test_an_output_in_a_read_only_directory_is_refused_in_one_line_naming_the_directory(
        tmp_path, monkeypatch, capsys):
    directory = tmp_path / "results"
    directory.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as a read-only mount answers, even root
        if Path(path).parent == directory and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    requests = write_jsonl(tmp_path / "in.jsonl", [good("a")])
    out = directory / "out.jsonl"
    assert main(["run", "--input", str(requests), "--output", str(out), "--model", "tiny"]) == 2
    assert capsys.readouterr().err == (f"star_engine: --output {out}: cannot write in {directory}: "
                                       "Read-only file system\n")
