"""Requests decoded together, contexts encoded once and shared, star, ring and dense and
hosts of several ranks under mpirun: each answer what the request gets alone."""

from __future__ import annotations

from tests.jobs import ALL_HOSTS, TINY, good, read_jsonl, write_jsonl
from tests.launcher import star_engine


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
