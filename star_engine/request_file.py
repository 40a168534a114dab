"""The requests of `run`: a JSONL file, one request a line, `{"id", "context", "query",
"max_new_tokens"?, "context_id"?}`. Every line becomes a request or the reason it cannot be
one, whatever it holds: bytes that are not UTF-8, JSON that is not valid or nested too deep,
numbers too long to read, text that is not text (lone surrogates).

The file is never held whole: one pass indexes it, a line at a time, keeping of each line
where it starts, its digest, its id and which context it asks about; a request is read
again when it is wanted. Memory grows with the number of lines, not with their text."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RequestLine:
    number: int  # in the file, from 1
    digest: str  # of its bytes: names the line in error records, so a rerun reports it once
    request: dict[str, Any] | None  # valid, with max_new_tokens filled in; else None
    error: str | None
    id: Any = None  # the request's id, where one could be read

    @property
    def shown_id(self) -> str:
        return shown(self.id)


def shown(rid: Any) -> str:
    """An id as progress lines print it: escaped (no newline or terminal control can pass),
    and short."""
    text = json.dumps(rid, ensure_ascii=True)
    return text if len(text) <= 64 else text[:61] + "..."


def printable(text: str) -> str:
    """Text as a log line may print it: control characters (newlines, terminal escapes)
    written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True, slots=True)
class IndexedLine:
    """What the index keeps of a non-blank line: enough to order, skip and report it
    without its text."""
    number: int  # in the file, from 1
    offset: int  # of its first byte
    digest: str  # of its bytes, as RequestLine's
    id: Any  # the request's id if the line is a valid request, else None
    context: int  # the number of the first line asking about the same context (its own if not valid)


class RequestFile:
    """A file of requests, indexed in one pass (`lines`); each line read again by `read`."""

    def __init__(self, path: Path, default_max_new_tokens: int) -> None:
        self.path, self.default_max_new_tokens = path, default_max_new_tokens
        self.file = path.open("rb")
        self.lines: list[IndexedLine] = []
        first_of_context: dict[bytes, int] = {}
        offset = 0
        for number, raw in enumerate(self.file, start=1):
            start, offset = offset, offset + len(raw)
            raw = raw.removesuffix(b"\n")
            if not raw.strip():
                continue
            line = parse_request_line(number, raw, default_max_new_tokens)
            if line.request is None:
                self.lines.append(IndexedLine(number, start, line.digest, None, number))
            else:
                context = first_of_context.setdefault(_context_key(line.request), number)
                self.lines.append(IndexedLine(number, start, line.digest, line.id, context))

    def read(self, line: IndexedLine) -> RequestLine:
        """The line, parsed; ValueError if it is not the line indexed."""
        self.file.seek(line.offset)
        raw = self.file.readline().removesuffix(b"\n")
        read = parse_request_line(line.number, raw, self.default_max_new_tokens)
        if read.digest != line.digest:
            raise ValueError(f"--input {self.path}: line {line.number} changed while the job ran")
        return read

    def __enter__(self) -> "RequestFile":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.file.close()


def _context_key(request: dict[str, Any]) -> bytes:
    """What names a request's context, the same for the requests about it: its `context_id`,
    else its text (as a digest, so that the text need not be kept)."""
    if isinstance(request.get("context_id"), (str, int)):
        return hashlib.sha256(b"id " + json.dumps(request["context_id"]).encode()).digest()
    return hashlib.sha256(b"text " + request["context"].encode()).digest()


def parse_request_line(number: int, raw: bytes, default_max_new_tokens: int) -> RequestLine:
    digest = hashlib.sha256(raw).hexdigest()[:16]
    request, error = _parse(raw, default_max_new_tokens)
    rid = request.get("id") if isinstance(request, dict) else None
    try:
        json.dumps(rid)
    except ValueError:  # an integer id too long for the results file to hold exactly
        rid, error = None, error or "'id' is an integer too long to write back exactly"
    return RequestLine(number, digest, request if error is None else None, error, rid)


def _parse(raw: bytes, default_max_new: int) -> tuple[dict | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
    try:
        request = json.loads(text)
    except RecursionError:
        return None, "not JSON this program reads: nested too deeply"
    except ValueError as exc:  # invalid JSON, or a number too long to convert
        return None, f"not JSON: {exc}"
    if not isinstance(request, dict):
        return None, "a request must be a JSON object"
    for name in ("id", "context", "query"):
        if name not in request:
            return request, f"missing field {name!r}"
    if not isinstance(request["id"], (str, int)) or isinstance(request["id"], bool):
        return request, "'id' must be a string or an integer"
    for name in ("context", "query"):
        if not isinstance(request[name], str):
            return request, f"{name!r} must be a string"
        try:
            request[name].encode("utf-8")
        except UnicodeEncodeError as exc:
            return request, f"{name!r} is not text: a lone surrogate (\\u{ord(exc.object[exc.start]):04x}) at " \
                            f"character {exc.start}"
    if not request["query"].strip():
        return request, "'query' is empty"
    max_new = request.get("max_new_tokens", default_max_new)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        return request, "'max_new_tokens' must be an integer >= 1"
    return {**request, "max_new_tokens": max_new}, None
