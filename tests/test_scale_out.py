"""Auto scale-out under mpirun: each request on as many hosts as its context needs, requests
of different sizes side by side, each answered as it is alone on a group of that size."""

from __future__ import annotations

import json

import pytest

from star_engine.groups import hosts_by_rule
from tests.jobs import TINY, read_jsonl, write_jsonl
from tests.launcher import star_engine

MAX_BLOCK = 256  # tokens: the tiny model's tokenizer makes 1 to 8 blocks of these contexts


def mixed_requests(count: int) -> list[dict]:
    """Contexts of 30 to 1800 tokens in no order, each with its own question."""
    sentences = ["The quick brown fox jumps over the lazy dog. ", "The vault code is 4417. ",
                 "Rain fell on the old stone bridge. "]
    lengths = [40, 900, 120, 1800, 60, 420, 1300, 80, 300, 30, 700, 150]
    return [{"id": f"r{i}", "context": sentences[i % 3] * (lengths[i % len(lengths)] // 30 + 1),
             "query": f"What is said in sentence {i}?"} for i in range(count)]


def run_job(tmp_path, name: str, requests: list[dict], ranks: int, flags: list[str]) -> tuple[dict, str]:
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", requests)
    out = tmp_path / f"{name}.jsonl"
    result = star_engine(["run", "--input", str(inp), "--output", str(out), *TINY, *flags], ranks=ranks)
    assert result.returncode == 0, result.stderr
    return {r["id"]: r for r in read_jsonl(out)}, result.stderr


def test_each_request_runs_on_the_hosts_the_rule_gives_it_and_answers_as_it_does_alone_there(tmp_path):
    requests = mixed_requests(12)
    auto, stderr = run_job(tmp_path, "auto", requests, 4, ["--hosts-per-request", "auto",
                                                            "--max-block", str(MAX_BLOCK), "--batch", "2"])
    assert "4 hosts form groups of 1, 2 and 4" in stderr
    assert sorted(auto) == sorted(r["id"] for r in requests)
    sizes = {}
    for rid, record in auto.items():
        hosts = record["hosts"]
        size = len(hosts)
        assert hosts == list(range(hosts[0], hosts[0] + size)) and hosts[0] % size == 0  # an aligned group
        assert size == hosts_by_rule(record["context_tokens"], MAX_BLOCK, 4), record
        sizes[rid] = size
    assert set(sizes.values()) == {1, 2, 4}  # the job mixes every group size
    # Alone on a group of its size: one host is dense; two or four run star across them.
    for size, flags in ((1, ["--attn", "dense"]), (2, []), (4, [])):
        mine = [r for r in requests if sizes[r["id"]] == size]
        alone, _ = run_job(tmp_path, f"alone{size}", mine, size, ["--hosts-per-request", "all", *flags])
        for rid, record in alone.items():
            assert auto[rid]["output"] == record["output"], (rid, size)


def test_run_gives_each_request_the_hosts_its_context_needs_unless_asked_otherwise(tmp_path):
    answers, _ = run_job(tmp_path, "default", mixed_requests(4), 2, [])
    hosts = [r["hosts"] for r in answers.values()]
    assert {len(h) for h in hosts} == {1} and {h[0] for h in hosts} == {0, 1}  # under 32K tokens: dense, side by side
    every, _ = run_job(tmp_path, "every", mixed_requests(4), 2, ["--hosts-per-request", "all"])
    assert {len(r["hosts"]) for r in every.values()} == {2}


def test_a_resumed_job_answers_each_id_once(tmp_path):
    requests = mixed_requests(8)
    out = tmp_path / "out.jsonl"
    flags = ["--hosts-per-request", "auto", "--max-block", str(MAX_BLOCK), *TINY]
    first = write_jsonl(tmp_path / "first.jsonl", requests[:5])
    result = star_engine(["run", "--input", str(first), "--output", str(out), *flags], ranks=4)
    assert result.returncode == 0, result.stderr
    every = write_jsonl(tmp_path / "every.jsonl", requests)
    result = star_engine(["run", "--input", str(every), "--output", str(out), *flags], ranks=4)
    assert result.returncode == 0, result.stderr
    assert "3 answered, 0 failed, 5 already done" in result.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(r["id"] for r in requests)


def test_hosts_of_two_ranks_scale_out_as_hosts_of_one_do(tmp_path):
    """8 ranks with --tp 2 are 4 hosts: the same groups and answers as 4 ranks of one."""
    requests = mixed_requests(6)
    flags = ["--hosts-per-request", "auto", "--max-block", str(MAX_BLOCK)]
    one, _ = run_job(tmp_path, "tp1", requests, 4, flags)
    two, stderr = run_job(tmp_path, "tp2", requests, 8, [*flags, "--tp", "2"])
    assert "4 hosts form groups of 1, 2 and 4" in stderr
    for rid, record in one.items():
        assert (len(two[rid]["hosts"]), two[rid]["output"]) == (len(record["hosts"]), record["output"]), rid


def test_a_fixed_number_of_hosts_runs_every_request_on_groups_of_that_size(tmp_path):
    requests = mixed_requests(4)
    fixed, stderr = run_job(tmp_path, "two", requests, 4, ["--hosts-per-request", "2"])
    assert {len(r["hosts"]) for r in fixed.values()} == {2}
    assert {r["hosts"][0] for r in fixed.values()} == {0, 2}  # both groups worked
    alone, _ = run_job(tmp_path, "alone", requests, 2, ["--hosts-per-request", "all"])
    assert {rid: r["output"] for rid, r in fixed.items()} == {rid: r["output"] for rid, r in alone.items()}


def test_a_number_of_hosts_that_is_no_group_size_is_refused_in_one_line(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", mixed_requests(1))
    result = star_engine(["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TINY,
                          "--hosts-per-request", "3"], ranks=4)
    assert result.returncode == 2
    assert result.stderr.count("star_engine: --hosts-per-request 3: 4 hosts form groups of 1, 2 and 4\n") == 1
    result = star_engine(["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TINY,
                          "--hosts-per-request", "all", "--max-block", "1K"])
    assert result.returncode == 2 and "--max-block takes effect only with --hosts-per-request auto" in result.stderr


def test_bench_measures_a_job_of_mixed_lengths_served_each_way_with_its_timeline(tmp_path):
    out = tmp_path / "mixed.json"
    result = star_engine(["bench", "--model", "tiny", "--job", "12", "--lengths", "256,1K,2K", "--mix", "4,1,1",
                          "--hosts-per-request", "auto,all", "--max-block", "512", "--batch", "2",
                          "--max-new-tokens", "4", "--attn", "star", "--output", str(out)], ranks=4)
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    auto, every = measured["rows"]
    assert (auto["hosts_per_request"], every["hosts_per_request"]) == ("auto", "all")
    assert [r["context"] for r in auto["requests"]] == [r["context"] for r in every["requests"]]
    assert {n: s["hosts"] for n, s in auto["by_length"].items()} == {"256": [1], "1024": [2], "2048": [4]}
    assert all(s["hosts"] == [4] for s in every["by_length"].values())
    for row in (auto, every):
        assert len(row["requests"]) == 12 and all(r["output_tokens"] == 4 for r in row["requests"])
        assert len(row["busy_fraction"]) == 4 and all(0 < b <= 1 for b in row["busy_fraction"])
        assert all(0 <= r["started_s"] < r["finished_s"] <= row["wall_s"] for r in row["requests"])
    ratio = measured["auto_against_all"]["requests_per_hour_x"]
    assert ratio == pytest.approx(auto["requests_per_hour"] / every["requests_per_hour"])
    assert "auto against all:" in result.stdout
    assert out.with_suffix(".png").exists() or "no plot" in result.stderr


def test_plan_predicts_a_job_of_mixed_lengths_with_each_way_of_serving_it():
    result = star_engine(["plan", "--job", "64", "--lengths", "4K,32K,128K", "--mix", "12,3,1", "--batch", "8",
                          "--gpus", "1,4", "--max-new-tokens", "256", "--attn", "star", "--layout", "balanced"])
    assert result.returncode == 0, result.stderr
    lines = {tuple(line.split()[:2]): line for line in result.stdout.splitlines()[2:]}
    assert "4096: 1, 32768: 1, 131072: 4" in lines["4", "auto"]
    assert "4096: 4, 32768: 4, 131072: 4" in lines["4", "all"]
    # One GPU is one host whatever the way.
    assert lines["1", "auto"].split()[2:4] == lines["1", "all"].split()[2:4]
