"""The answers of `run`: a JSONL file, one record a request, appended as each is answered.

It is the job's memory: a rerun skips the ids it holds answered and the bad lines it holds
reported, so that an interrupted job goes on where it stopped and reports each bad line
once. It is read a line at a time, keeping only ids and the digests of reported lines. A
stop that leaves requests unfinished notes their ids beside it; a request left unfinished
at the next stop too gets an error record, so that a request that cannot finish before the
time limit is not tried forever. One run writes a file at a time (a lock beside it names
the holder; STAR_ENGINE_NO_LOCK=1 goes without, where the file system has no locks). A
file that is not a results file of this program is refused, a last line cut short by an
interruption is dropped, a complete one kept. `-`, a pipe or a terminal is written as
answers come, without reading anything first.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator

from .environment import job_setting
from .json_file import write_json

# The error record of a request that a stop left unfinished twice in a row.
NOT_FINISHED = "not finished in two runs of the job: raise the time limit"


class AnswerFileError(ValueError):
    """The output cannot be used (not writable, held by another run, on a file system
    without locks, or not a results file)."""


def is_stream(path: Path) -> bool:
    """`-`, or something that is read as it is written (a pipe, a terminal)."""
    if str(path) == "-":
        return True
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def check_answer_file(path: Path) -> None:
    """Raises AnswerFileError if `path` cannot be written, is held by another run or is not a
    results file."""
    if is_stream(path):
        return
    if path.is_dir():
        raise AnswerFileError(f"--output {path} is a directory")
    lock = _Lock(path)
    try:
        lock.take(shared=True)  # every rank checks at once: shared, they do not exclude each other
    finally:
        lock.release()
    if path.exists():
        for _ in _records(path):
            pass


class AnswerFile:
    """Rank 0's view of the output: what is done, what is in hand, and appending (a record
    is written whole while holding `writing`, which a stop that abandons the job takes
    before it ends the process)."""

    def __init__(self, path: Path, writing: threading.RLock) -> None:
        self.path, self.writing = path, writing
        self.answered: set[str] = set()  # ids (as JSON) answered
        self.reported: set[tuple[str, str]] = set()  # (line digest, error) written
        self._in_hand: dict[str, tuple[int, str, Any]] = {}  # by id (as JSON): (line, digest, id)
        self._unfinished_before: set[str] = set()  # ids (as JSON) the last stop left unfinished
        self.skipped = self.errors = self.already_reported = 0
        self._lock: _Lock | None = None
        self._unfinished: Path | None = None
        if is_stream(path):
            self.file: IO[str] = sys.stdout if str(path) == "-" else path.open("a")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(path)
        self._lock.take()
        self._unfinished = path.with_name(f".{path.name}.unfinished")
        if path.exists():
            for record in _records(path, repair=True):
                if record.get("error") is None:
                    self.answered.add(json.dumps(record["id"]))
                elif "input_sha256" in record:
                    self.reported.add((record["input_sha256"], record["error"]))
            if self._unfinished.exists():
                noted = json.loads(self._unfinished.read_text())["ids"]
                self._unfinished_before = {json.dumps(rid) for rid in noted}
        self.file = path.open("a")

    def hand_out(self, line_number: int, digest: str, rid: Any) -> None:
        """The request of this line is being answered."""
        with self.writing:
            self._in_hand[json.dumps(rid)] = (line_number, digest, rid)

    def write_answer(self, record: dict[str, Any]) -> None:
        with self.writing:
            self._append(record)
            del self._in_hand[json.dumps(record["id"])]

    def write_error(self, line_number: int, digest: str, rid: Any, error: str) -> bool:
        """Writes a bad line's error record, unless an earlier run wrote the same; True if
        written."""
        if (digest, error) in self.reported:
            self.already_reported += 1
            return False
        self.reported.add((digest, error))
        self.errors += 1
        self._append({"id": rid, "output": None, "output_tokens": 0, "context_tokens": None, "metrics": None,
                      "error": error, "line": line_number, "input_sha256": digest})
        return True

    def given_up(self, digest: str) -> bool:
        """Whether the request of the line with this digest was left unfinished at two stops
        in a row (and has its error record)."""
        return (digest, NOT_FINISHED) in self.reported

    def note_stop(self) -> list[tuple[int, Any]]:
        """Where the job ends, stopped or done: the requests in hand are left unfinished.
        Those the last stop left unfinished too get their error record; the others are
        noted beside the output for the next run. The (line, id) of those given up."""
        given_up, left = [], []
        with self.writing:
            for key, (line, digest, rid) in self._in_hand.items():
                if key not in self._unfinished_before:
                    left.append(rid)
                elif self.write_error(line, digest, rid, NOT_FINISHED):
                    given_up.append((line, rid))
            if self._unfinished is not None:
                if left:
                    write_json(self._unfinished, {"ids": left})
                else:
                    self._unfinished.unlink(missing_ok=True)
        return given_up

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()
        if self._lock is not None:
            self._lock.release()

    def _append(self, record: dict[str, Any]) -> None:
        with self.writing:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def _records(path: Path, repair: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a results file, a line at a time; AnswerFileError at a line that is not
    one. With repair, a last line cut short (no newline, not JSON) is dropped and a complete
    one given its newline."""
    with path.open("rb") as f:
        end = 0  # of the lines read
        for number, raw in enumerate(f, start=1):
            record = _record(raw)
            if not raw.endswith(b"\n"):  # the last line, cut short or only without its newline
                break
            if record is None:
                raise AnswerFileError(f"--output {path}: line {number} is not a result of this program; "
                                      "give another file")
            end += len(raw)
            yield record
        else:
            return
    if repair:
        with path.open("r+b") as f:
            if record is None:  # written in part when a job ended: it is answered again
                f.truncate(end)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
    if record is not None:
        yield record


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and "id" in record and "error" in record else None


class _Lock:
    """flock on a file beside the output, which says who holds it; none where
    STAR_ENGINE_NO_LOCK=1."""

    def __init__(self, path: Path) -> None:
        self.output = path
        self.path = path.with_name(f".{path.name}.lock")
        self.fd: int | None = None

    def take(self, shared: bool = False) -> None:
        """Held while the output is written; `shared` only looks whether another run holds it."""
        if job_setting("STAR_ENGINE_NO_LOCK") == "1":
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AnswerFileError(f"--output {self.output}: cannot write in {self.path.parent}: "
                                  f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
                    raise AnswerFileError(f"--output {self.output} is being written by {holder}; one run writes "
                                          "a file at a time") from None
                # Lustre mounted without -o flock, NFS without its lock service: no locks at all.
                raise AnswerFileError(f"--output {self.output}: the file system of {self.path.parent} does not "
                                      f"lock files ({exc.strerror}): mount it with locks (Lustre: -o flock), write "
                                      "the output elsewhere, or set STAR_ENGINE_NO_LOCK=1 to write it without the "
                                      "lock if no other run writes it") from None
            finally:
                os.close(fd)
        self.fd = fd
        if not shared:
            os.ftruncate(fd, 0)
            since = datetime.datetime.now().isoformat(timespec="seconds")
            os.write(fd, f"star_engine run, process {os.getpid()} on {socket.gethostname()}, since {since}".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it could race)
            self.fd = None
