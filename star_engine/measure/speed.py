"""Star against Ring Attention and dense, same model, same ranks, one run: time to first
token, phase-1 time, time per output token, peak memory and bytes sent per rank, over a
range of context lengths. Contexts are random token ids: speed does not depend on them.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Callable, Iterator

import torch

from ..attention.spec import StrategySpec
from ..budget import fits, least_free_memory, request_budget
from ..comm import Communicator
from ..costs import Calibration, decode_weights, kv_bytes_per_token
from ..engine import Engine, Generation
from ..launch.control import Dist
from ..model import Transformer
from ..request_plan import RequestPlan, plan_request
from ..settings import KVCacheSettings
from ..slots import contexts_at_once
from .text_table import text_table
from .timing import copy_bandwidth, graph_replay_s


def all_reduce_latency(model: Transformer, layers: int) -> float:
    """Seconds per all-reduce of one decode token's hidden state over the host, `layers`
    calls replayed from one CUDA graph as in a decode step (a step makes two a layer)."""
    weight = model.embed.weight
    x = torch.randn(1, model.config.hidden_size, device=weight.device, dtype=weight.dtype)

    def step() -> None:
        for _ in range(layers):
            model.host.all_reduce_(x)

    return graph_replay_s(step, weight.device) / layers


def gather_merge_latency(comm: Communicator, heads: int, dim: int, dtype: torch.dtype,
                         device: torch.device, layers: int) -> float:
    """Seconds per gather_merge of one decode token's (o, lse), `layers` calls replayed
    from one CUDA graph as in a decode step."""
    o = torch.randn(heads, 1, dim, device=device, dtype=dtype)
    lse = torch.randn(heads, 1, device=device)

    def step() -> None:
        for _ in range(layers):
            comm.gather_merge(o, lse)

    return graph_replay_s(step, device) / layers


def run_benchmark(model: Transformer, comm: Communicator, dist: Dist, specs: list[StrategySpec],
                  calibration: Calibration, lengths: list[int], query_tokens: int, new_tokens: int, cuda_graph: bool,
                  say: Callable[[str], None],
                  on_row: Callable[[list[dict], dict], None] = lambda rows, ceilings: None) -> tuple[list[dict], dict]:
    """The measured rows, and the ceilings the time per output token is held against
    (on GPUs: memory bandwidth and the collective's latency per layer, measured here).
    calibration: the job's (the same on every rank), which balanced layouts weigh blocks by.
    on_row(rows so far, ceilings) follows every row, so that a stopped run keeps them."""
    cfg, weight = model.config, model.embed.weight
    kv_bytes = kv_bytes_per_token(cfg, weight.element_size(), model.kv_heads)
    ceilings = {}
    if weight.is_cuda:
        bandwidth = min(dist.allgather(copy_bandwidth(weight.device)))
        # One host's decode step has no gather_merge (its attention is already global).
        latency = max(dist.allgather(gather_merge_latency(comm, model.heads, cfg.head_dim, weight.dtype,
                                                              weight.device, cfg.num_layers))) if comm.world > 1 else 0.0
        reduce = max(dist.allgather(all_reduce_latency(model, cfg.num_layers))) if model.host is not None else 0.0
        ceilings = {"copy_bandwidth_Bps": bandwidth, "gather_merge_s_per_layer": latency,
                    "all_reduce_s": reduce, "decode_weight_bytes": decode_weight_bytes(model)}
        say(f"  ceilings: device-to-device copy {bandwidth / 1e9:.0f} GB/s, gather_merge {latency * 1e6:.1f} "
            f"us per layer, all-reduce {reduce * 1e6:.1f} us, {ceilings['decode_weight_bytes'] / 2**30:.2f} GiB "
            "of weights per token and rank")
    rows = []
    for spec in specs:
        strategy = spec.build(comm.place, comm, cfg, calibration)
        for i, length in enumerate(lengths):
            plan = plan_request(strategy, length, query_tokens, new_tokens)
            row = {"attn": spec.attn, "label": spec.label, "spec": spec.as_dict(), "ranks": dist.world,
                   "tp": dist.world // comm.world, "context": length, "describe": strategy.describe()}
            budget = request_budget(plan, cfg, weight.element_size(), model.shard.size)
            if not fits(budget, least_free_memory(dist, weight.device), weights_in_place=True):
                say(f"  {spec.label} {length:>8} tokens: skipped, does not fit in memory")
                rows.append({**row, "skipped": "memory"})
                on_row(rows, ceilings)
                continue
            engine = Engine(model, strategy, comm, dist, KVCacheSettings(plan.total, max_tail=plan.tail), cuda_graph)
            ids = torch.randint(0, cfg.vocab_size, (length + query_tokens,), generator=torch.Generator().manual_seed(0))
            # Always new_tokens tokens: random weights may produce an end-of-sequence id.
            if i == 0:  # once untimed: kernel loading, library heuristics, graph capture
                engine.generate(ids[:length], ids[length:], new_tokens, plan=plan, stop_at_eos=False)
            gen = engine.generate(ids[:length], ids[length:], new_tokens, plan=plan, stop_at_eos=False)
            m = gen.metrics
            result = {**row, "phase1_s": m.phase1_s, "phase1_per_rank_s": m.phase1_per_rank_s,
                      "ttft_s": m.ttft_s, "tpot_s": m.tpot_s,
                      "peak_mem_bytes": m.peak_mem_bytes, "bytes_sent": m.bytes_sent,
                      "output_tokens": len(gen.tokens)}
            if ceilings:
                # Roofline of one decode step on the busiest rank: its weights and K/V (half
                # way through the generation) read once at copy bandwidth, plus one
                # gather_merge per layer and, on a host of several ranks, two all-reduces.
                kept = [slots - (new_tokens - new_tokens // 2 if r == plan.query_rank else 0)
                        for r, slots in enumerate(plan.kv_slots)]
                result["tpot_roofline_s"] = ((ceilings["decode_weight_bytes"] + max(kept) * kv_bytes)
                                             / ceilings["copy_bandwidth_Bps"]
                                             + cfg.num_layers * (ceilings["gather_merge_s_per_layer"]
                                                                 + 2 * ceilings["all_reduce_s"]))
            rows.append(result)
            on_row(rows, ceilings)
            tpot = "-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.2f} ms"
            say(f"  {spec.label} {length:>8} tokens: phase 1 {m.phase1_s:.3f} s, first token {m.ttft_s:.3f} s, "
                f"per token {tpot}, peak {max(m.peak_mem_bytes) / 2**30:.2f} GiB/rank")
            del engine
            if weight.is_cuda:
                torch.cuda.empty_cache()
    return rows, ceilings


def run_job(model: Transformer, comm: Communicator, dist: Dist, spec: StrategySpec, calibration: Calibration,
            length: int, requests: int, questions: int, query_tokens: int, new_tokens: int, cuda_graph: bool,
            say: Callable[[str], None], batch: int = 1) -> list[dict]:
    """A job of `requests` requests on requests/questions contexts of `length` tokens, each
    asked `questions` questions, run one request at a time (each context encoded once for
    its questions), and (batch > 1) with up to `batch` requests decoding together: where
    questions share a context, reading its K/V from one arena and, for comparison, each from
    a copy of its own (where the copies fit). Per run: the wall time, requests per
    hour, output tokens per second, decode tokens per second (the tokens after each first
    over the time not spent on phase 1 and queries, which run one request at a time), each
    request's time to first token and its latency from the job's start."""
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, cfg.vocab_size, (length,), generator=generator)
                for _ in range(-(-requests // questions))]
    queries = [torch.randint(0, cfg.vocab_size, (query_tokens,), generator=generator) for _ in range(requests)]
    jobs = [(contexts[i // questions], query) for i, query in enumerate(queries)]
    row = {"attn": spec.attn, "label": spec.label, "spec": spec.as_dict(), "context": length, "requests": requests,
           "questions_per_context": questions}

    def measured(mode: str, answers: Callable[[], Iterator[tuple[int, Generation]]]) -> dict:
        ttft, latency, reused = [0.0] * requests, [0.0] * requests, [False] * requests
        tokens = 0
        dist.sync()
        start = time.perf_counter()
        for index, gen in answers():
            ttft[index], reused[index] = gen.metrics.ttft_s, gen.metrics.context_reused
            latency[index] = time.perf_counter() - start
            tokens += len(gen.tokens)
        wall = time.perf_counter() - start
        decode_s = wall - sum(ttft)
        result = {**row, "mode": mode, "wall_s": wall, "requests_per_hour": requests / wall * 3600,
                  "output_tokens_per_s": tokens / wall, "decode_s": decode_s,
                  "decode_tokens_per_s": (tokens - requests) / decode_s if decode_s > 0 else None,
                  "ttft_s": ttft, "latency_s": latency, "context_reused": reused}
        say(f"  {spec.label} {length:>8} tokens, {requests} requests, {questions} a context, {mode}: {wall:.2f} s, "
            f"{result['requests_per_hour']:.0f} requests/hour, {result['output_tokens_per_s']:.1f} tokens/s, "
            f"decoding {result['decode_tokens_per_s'] or 0:.1f} tokens/s")
        return result

    cache = KVCacheSettings(length + query_tokens + new_tokens, max_tail=query_tokens + new_tokens)
    engine = Engine(model, spec.build(comm.place, comm, cfg, calibration), comm, dist, cache, cuda_graph)
    # A context that several questions share is encoded without any of them (plan_request).
    plan = engine.plan(length, query_tokens, new_tokens, shared_context=questions > 1)
    engine.generate(*jobs[0], new_tokens, plan=plan, stop_at_eos=False)  # untimed: kernels, graph capture
    # One at a time, each context encoded once for its questions where there are several
    # (encoding it again for each would add only phase 1s, a question's worth each).
    reuse = questions > 1
    engine.forget_contexts()
    rows = [measured("one at a time" + (", context once" if reuse else ""), lambda: (
        (i, engine.generate(context, query, new_tokens, plan=plan, reuse_context=reuse, stop_at_eos=False))
        for i, (context, query) in enumerate(jobs)))]
    if batch > 1:
        del engine
        if model.embed.weight.is_cuda:
            torch.cuda.empty_cache()  # the next engine's arenas, in one piece where they fit
        # Questions of one context read its K/V from one arena; for comparison, each with a
        # copy of it (where the copies fit).
        for shared in (True, False) if questions > 1 else (False,):
            contexts = contexts_at_once(batch, questions) if shared else batch
            try:
                together = Engine(model, spec.build(comm.place, comm, cfg, calibration), comm, dist,
                                  replace(cache, batch=batch, contexts=contexts, share_contexts=shared), cuda_graph)
            except ValueError as exc:  # the memory check's refusal, alike on every rank
                say(f"  {spec.label} {length:>8} tokens, batch {batch}{'' if shared else ', copies'}: {exc}")
                continue
            plan = together.plan(length, query_tokens, new_tokens, shared_context=questions > 1)
            list(together.generate_many([(*jobs[0], plan)] * batch, stop_at_eos=False))  # untimed: a full step
            together.forget_contexts()
            mode = f"batch {batch}" + ("" if shared or questions == 1 else ", copies")
            rows.append(measured(mode, lambda: together.generate_many(
                [(context, query, plan) for context, query in jobs], stop_at_eos=False)))
            rows[-1]["decode_roofline_gain_x"] = batched_decode_roofline_gain(model, plan, batch)
            rows[-1]["contexts_held"] = together.whole_requests
            del together
            if model.embed.weight.is_cuda:
                torch.cuda.empty_cache()
    return rows


def decode_weight_bytes(model: Transformer) -> int:
    """Weight bytes a decode step reads on the rank of the model's host that holds the most."""
    return decode_weights(model.config, model.shard.size) * model.embed.weight.element_size()


def batched_decode_roofline_gain(model: Transformer, plan: RequestPlan, batch: int) -> float:
    """What `batch` requests decoding together gain in tokens per second over one at a time
    if a step takes the time of the bytes it reads: the weights once, plus each request's own
    K/V (the busiest rank's share at the request's full length). Not a bound: a lone step
    also pays fixed costs (launches, collectives) that a step of `batch` shares, so the
    measured gain can exceed it."""
    weights = decode_weight_bytes(model)
    kv = max(plan.kv_slots) * kv_bytes_per_token(model.config, model.embed.weight.element_size(), model.kv_heads)
    return batch * (weights + kv) / (weights + batch * kv)


def job_table(rows: list[dict]) -> str:
    """Per run of a job: its requests, wall time, rates, decoding's gain over one request at
    a time (and the roofline's, where batched), the mean time to first token."""
    alone = {(r["label"], r["context"]): r for r in rows if r["mode"].startswith("one at a time")}
    lines = []
    for r in rows:
        first = alone.get((r["label"], r["context"]))
        gain = (r["decode_tokens_per_s"] / first["decode_tokens_per_s"]
                if first and r["decode_tokens_per_s"] and first["decode_tokens_per_s"] else None)
        lines.append({"attn": r["label"], "context": r["context"], "requests": r["requests"],
                      "per ctx": r["questions_per_context"], "mode": r["mode"], "wall s": f"{r['wall_s']:.2f}",
                      "req/hour": f"{r['requests_per_hour']:.0f}", "tokens/s": f"{r['output_tokens_per_s']:.1f}",
                      "decode/s": f"{r['decode_tokens_per_s'] or 0:.1f}",
                      "x alone": None if gain is None else f"{gain:.2f}x",
                      "mean ttft s": f"{sum(r['ttft_s']) / len(r['ttft_s']):.3f}",
                      "roofline gain": (f"{r['decode_roofline_gain_x']:.2f}x" if "decode_roofline_gain_x" in r
                                        else None)})
    return text_table(lines, ["attn", "context", "requests", "per ctx", "mode", "wall s", "req/hour", "tokens/s",
                              "decode/s", "x alone", "mean ttft s", "roofline gain"], left={"attn", "mode"})


def speedups(rows: list[dict]) -> list[dict]:
    """Each star layout's time to first token against ring's and dense's at each length."""
    by = {(label(r), r["context"]): r for r in rows if "ttft_s" in r}
    out = []
    for (name, length), star in sorted(by.items(), key=lambda kv: kv[0][1]):
        if star["attn"] != "star":
            continue
        entry = {"context": length, "star": name}
        for other in ("ring", "dense"):
            if (other, length) in by:
                entry[f"over_{other}"] = by[other, length]["ttft_s"] / star["ttft_s"]
        out.append(entry)
    return out


def label(row: dict) -> str:
    """A row's strategy as its spec labels it (rows of earlier versions: its name)."""
    return row.get("label", row["attn"])


def spec_of(row: dict) -> StrategySpec:
    """The spec a row ran: recorded, or (rows of earlier versions) read from its description."""
    if "spec" in row:
        return StrategySpec(**row["spec"])
    if row["attn"] != "star":
        return StrategySpec(row["attn"])
    fraction = re.search(r"anchor ([0-9.]+) of the block", row.get("describe", ""))
    return StrategySpec(anchor_fraction=float(fraction[1]) if fraction else None)


def table(rows: list[dict]) -> str:
    """Per run: phase 1, the query pass (phase 2 up to the first token), time to first
    token, time per output token and its ratio to the roofline, peak memory of the
    busiest rank."""
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append({"attn": label(r), "context": r["context"], "": f"skipped: {r['skipped']}"})
            continue
        ratio = None if r["tpot_s"] is None or "tpot_roofline_s" not in r else r["tpot_s"] / r["tpot_roofline_s"]
        lines.append({"attn": label(r), "context": r["context"], "phase1 s": f"{r['phase1_s']:.3f}",
                      "query s": f"{r['ttft_s'] - r['phase1_s']:.3f}", "ttft s": f"{r['ttft_s']:.3f}",
                      "tpot ms": None if r["tpot_s"] is None else f"{r['tpot_s'] * 1e3:.2f}",
                      "/roofline": None if ratio is None else f"{ratio:.2f}",
                      "peak GiB/rank": f"{max(r['peak_mem_bytes']) / 2**30:.2f}"})
    return text_table(lines, ["attn", "context", "phase1 s", "query s", "ttft s", "tpot ms", "/roofline",
                              "peak GiB/rank", ""], left={"attn", ""})
