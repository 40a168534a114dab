"""A job of requests of mixed lengths, served as `run` serves a file: each request on the
hosts --hosts-per-request gives it (auto: as many as its context needs; all: every host),
requests side by side where groups allow. Per way of serving: the wall time, requests per
hour, output tokens per second, each rank's busy fraction, and per request its hosts, when
its group took it and answered it, its time to first token; by length, the median and 90th
percentile of the time to first token and of the latency."""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..hand_out import Done, Work, serve
from ..settings import KVCacheSettings, ScaleOutSettings

WARM_UP_TOKENS = 4  # of each warm-up request: enough for every decode bucket of a full batch

if TYPE_CHECKING:
    from ..attention.spec import StrategySpec
    from ..session import Session


def mixed_lengths(lengths: list[int], mix: list[int], requests: int, seed: int = 0) -> list[int]:
    """`requests` context lengths in the proportions of `mix` (rounded, at least one of each),
    in a shuffled order that the seed fixes."""
    total = sum(mix)
    counts = [max(1, round(requests * share / total)) for share in mix]
    order = [length for length, count in zip(lengths, counts) for _ in range(count)]
    random.Random(seed).shuffle(order)
    return order


def mix_phrase(lengths: list[int], distinct: list[int]) -> str:
    """'12 of 4096 tokens, 3 of 32768 tokens': how many requests of each length a job has."""
    return ", ".join(f"{lengths.count(n)} of {n} tokens" for n in distinct)


def run_mixed_job(session: Session, spec: StrategySpec, lengths: list[int], query_tokens: int, new_tokens: int,
                  batch: int, ways: list[ScaleOutSettings], say: Callable[[str], None]) -> list[dict]:
    """The job of these context lengths (in order), served each of `ways`: a row each."""
    from ..launch.stopping import GracefulStop

    cfg = session.model.config
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    queries = [torch.randint(0, cfg.vocab_size, (query_tokens,), generator=generator).tolist() for _ in lengths]
    cache = KVCacheSettings(max(lengths) + query_tokens + new_tokens, batch, max_tail=query_tokens + new_tokens)
    rows = []
    with GracefulStop() as stop:
        for way in ways:
            groups, engines, sizing = session.group_engines(spec, cache, way)

            def requests() -> Iterator[Work]:  # rank 0's
                for i, length in enumerate(lengths):
                    hosts, plan = sizing.plan(length, query_tokens, new_tokens)
                    yield Work(i, contexts[i], queries[i], plan, hosts, sizing.cost(hosts, plan))

            # Untimed: each group size's kernels and decode graphs (a full batch of a few tokens
            # each), on every group of it.
            shortest = lengths.index(min(lengths))
            warm = None
            if session.dist.rank == 0:  # rank 0 has an engine of every group size
                sizes = [s for s in sorted(engines) for _ in range(batch * groups.count // s)]
                warm = iter([Work(k, contexts[shortest], queries[shortest],
                                  engines[size].plan(lengths[shortest], query_tokens, WARM_UP_TOKENS), size, 1.0)
                             for k, size in enumerate(sizes)])
            serve(session.dist, groups, engines, stop, warm, None, batch, stop_at_eos=False)
            done: list[Done] = []
            session.dist.sync()
            start = time.time()
            served = serve(session.dist, groups, engines, stop, requests() if session.dist.rank == 0 else None,
                           done.append, batch, stop_at_eos=False)
            wall = time.time() - start
            if served.stopped:
                raise KeyboardInterrupt  # the job was asked to stop: no row of a part of it
            rows.append(_row(way, done, start, wall, served.busy_s, new_tokens))
            say(f"  {way.hosts_per_request}: {wall:.2f} s, {rows[-1]['requests_per_hour']:.0f} requests/hour, "
                f"{rows[-1]['output_tokens_per_s']:.1f} tokens/s, busy "
                + ", ".join(f"{b:.0%}" for b in rows[-1]["busy_fraction"]))
            del engines, groups, sizing
    return rows


def _row(way: ScaleOutSettings, done: list[Done], start: float, wall: float, busy: list[float],
         new_tokens: int) -> dict:
    requests = sorted(({"number": d.work.number, "context": d.work.plan.context_len, "hosts": list(d.group.hosts),
                        "started_s": d.started - start, "finished_s": d.finished - start,
                        "ttft_s": d.generation.metrics.ttft_s, "latency_s": d.finished - start,
                        "output_tokens": len(d.generation.tokens)} for d in done), key=lambda r: r["number"])
    tokens = sum(r["output_tokens"] for r in requests)
    by_length = {}
    for length in sorted({r["context"] for r in requests}):
        mine = [r for r in requests if r["context"] == length]
        by_length[str(length)] = {"requests": len(mine),
                                  "hosts": sorted({len(r["hosts"]) for r in mine}),
                                  **{f"{what}_{stat}": value for what in ("ttft_s", "latency_s")
                                     for stat, value in spread([r[what] for r in mine]).items()}}
    return {"hosts_per_request": way.hosts_per_request, "max_block": way.max_block, "wall_s": wall,
            "requests_per_hour": len(requests) / wall * 3600, "output_tokens_per_s": tokens / wall,
            "new_tokens": new_tokens, "busy_fraction": [b / wall for b in busy], "by_length": by_length,
            "requests": requests}


def spread(values: list[float]) -> dict[str, float]:
    """The median and 90th percentile (nearest rank) of some values."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, -(-9 * len(ordered) // 10) - 1)]}


def comparison(rows: list[dict]) -> dict | None:
    """auto against all, where both ran: requests per hour, the shortest requests' latency
    (median and 90th percentile) and the longest requests' time to first token, as ratios."""
    by = {r["hosts_per_request"]: r for r in rows}
    if not {"auto", "all"} <= set(by):
        return None
    auto, every = by["auto"], by["all"]
    shortest, longest = min(auto["by_length"], key=int), max(auto["by_length"], key=int)
    return {"requests_per_hour_x": auto["requests_per_hour"] / every["requests_per_hour"],
            "shortest": int(shortest), "longest": int(longest),
            "shortest_latency_median_x": auto["by_length"][shortest]["latency_s_median"]
            / every["by_length"][shortest]["latency_s_median"],
            "shortest_latency_p90_x": auto["by_length"][shortest]["latency_s_p90"]
            / every["by_length"][shortest]["latency_s_p90"],
            "longest_ttft_median_x": auto["by_length"][longest]["ttft_s_median"]
            / every["by_length"][longest]["ttft_s_median"]}


def table(rows: list[dict]) -> str:
    """Per way and length: requests, hosts, time to first token and latency (median, 90th
    percentile); per way: wall time and requests per hour."""
    from .text_table import text_table

    lines = []
    for row in rows:
        for length, s in row["by_length"].items():
            lines.append({"hosts/request": row["hosts_per_request"], "context": length, "requests": s["requests"],
                          "hosts": ",".join(map(str, s["hosts"])),
                          "ttft s": f"{s['ttft_s_median']:.2f} / {s['ttft_s_p90']:.2f}",
                          "latency s": f"{s['latency_s_median']:.2f} / {s['latency_s_p90']:.2f}",
                          "job s": f"{row['wall_s']:.1f}", "req/hour": f"{row['requests_per_hour']:.0f}"})
    return text_table(lines, ["hosts/request", "context", "requests", "hosts", "ttft s", "latency s", "job s",
                              "req/hour"], left={"hosts/request"}) + "\n(ttft and latency: median / 90th percentile)"
