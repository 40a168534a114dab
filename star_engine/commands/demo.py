"""`demo`: a long document with a hidden fact; star's answer beside dense's, with timings."""

from __future__ import annotations

import argparse

from ..flags import (add_generation_flags, add_model_flags, add_star_flags, kv_cache_settings, positive,
                     runtime_settings, star_specs)


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="a long document with a hidden fact: star's answer beside dense's",
        description="Builds a needle-in-a-haystack document, answers its question with star "
                    "attention over all ranks and with dense attention, and prints both answers "
                    "with their timings.")
    demo.add_argument("--context-tokens", type=positive, default=3000,
                      help="length of the prompt, document and question, in tokens (default: 3000)")
    demo.add_argument("--seed", type=int, default=0, help="which document (default: 0)")
    add_model_flags(demo)
    add_star_flags(demo)
    add_generation_flags(demo, max_new_tokens=12)


def check(args: argparse.Namespace) -> None:
    """Also makes the settings: args.runtime, args.cache and args.specs, star as the flags
    lay it out and dense."""
    args.runtime = runtime_settings(args)
    args.specs, args.cache = star_specs(args, ["star", "dense"]), kv_cache_settings(args)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..measure.tasks import make_sample, score
    from ..session import Session

    session = Session(args.runtime)
    dist = session.dist
    sample = make_sample("niah_single_1", session.tokenizer, args.context_tokens, args.seed) if dist.rank == 0 else None
    sample = dist.bcast(sample, root=0)
    session.say(f"\nDocument: {len(sample.context_ids)} context tokens, {len(sample.query_ids)} query tokens."
                f"\nQuestion: {sample.query}\nAnswer begins: {sample.answer_prefix}"
                f"\nExpected: {', '.join(sample.answers)}\n")
    rows = []
    for spec in args.specs:
        engine = session.engine(spec, args.cache)
        session.say(f"running {engine.strategy.describe()} ...")
        gen = engine.generate(torch.as_tensor(sample.context_ids), torch.as_tensor(sample.query_ids),
                              args.max_new_tokens)
        if dist.rank == 0:
            text = session.tokenizer.decode(gen.tokens).strip()
            rows.append((spec.attn, text, score(text, sample.answers), gen.metrics))
        del engine
    if dist.rank == 0:
        print(_table(rows, dist.world))
    return 0


def _table(rows: list, world: int) -> str:
    """The methods side by side: a column each, a line per measure."""
    from ..measure.text_table import text_table

    methods = [f"{attn} ({world} rank{'s' if world > 1 else ''})" for attn, _, _, _ in rows]
    measures = {
        "answer": [repr(text) for _, text, _, _ in rows],
        "correct": ["yes" if hit == 1 else "no" for _, _, hit, _ in rows],
        "phase 1 (s)": [f"{m.phase1_s:.3f}" for _, _, _, m in rows],
        "first token (s)": [f"{m.ttft_s:.3f}" for _, _, _, m in rows],
        "per token (ms)": ["-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f}" for _, _, _, m in rows],
        "peak memory, max rank (MiB)": [f"{max(m.peak_mem_bytes) / 2**20:.0f}" for _, _, _, m in rows],
    }
    lines = [{"": measure, **dict(zip(methods, values))} for measure, values in measures.items()]
    return text_table(lines, ["", *methods], left={"", *methods})
