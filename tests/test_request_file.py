"""The input of `run`, indexed in one pass and read again a request at a time."""

from __future__ import annotations

import json

import pytest

from star_engine.request_file import RequestFile


def test_the_index_keeps_each_line_s_place_id_and_context_and_a_line_read_again_is_the_one_indexed(tmp_path):
    lines = [{"id": "a1", "context": "doc A", "query": "q?"},
             {"id": "b1", "context": "doc B", "query": "q?"},
             "not json",
             {"id": "a2", "context": "doc A", "query": "again?", "max_new_tokens": 5},
             {"id": "b2", "context": "other text", "context_id": "B", "query": "q?"},
             {"id": "b3", "context": "more text", "context_id": "B", "query": "q?"}]
    raw = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path = tmp_path / "in.jsonl"
    # A blank line counts in the numbering; the last line has no newline.
    path.write_text(f"{raw[0]}\n\n{raw[1]}\r\n{raw[2]}\n{raw[3]}\n{raw[4]}\n{raw[5]}")
    with RequestFile(path, default_max_new_tokens=64) as requests:
        assert [(line.number, line.id, line.context) for line in requests.lines] == [
            (1, "a1", 1), (3, "b1", 3), (4, None, 4), (5, "a2", 1), (6, "b2", 6), (7, "b3", 6)]
        a2 = requests.read(requests.lines[3])
        assert a2.request == {**lines[3], "max_new_tokens": 5} and a2.number == 5
        assert requests.read(requests.lines[0]).request["max_new_tokens"] == 64
        assert requests.read(requests.lines[1]).request["id"] == "b1"  # its \r is JSON's whitespace
        assert requests.read(requests.lines[2]).error.startswith("not JSON")
        assert requests.read(requests.lines[5]).request["context"] == "more text"


def test_a_line_that_changed_since_it_was_indexed_ends_the_job_instead_of_being_misread(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "context": "c", "query": "q?"}\n{"id": "b", "context": "c", "query": "q?"}\n')
    with RequestFile(path, default_max_new_tokens=64) as requests:
        path.write_text('{"id": "a", "context": "c", "query": "q?"}\n{"id": "B", "context": "c", "query": "q?"}\n')
        assert requests.read(requests.lines[0]).request["id"] == "a"
        with pytest.raises(ValueError, match=f"--input {path}: line 2 changed while the job ran"):
            requests.read(requests.lines[1])
