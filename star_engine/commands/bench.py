"""`bench`: star against ring and dense on the ranks of the job, over context lengths:
latency, memory and bytes sent; a table, JSON and a plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..flags import (add_generation_flags, add_lengths_flag, add_model_flags, add_query_tokens_flag,
                     add_scale_out_flags, add_star_flags, counts_list, positive, runtime_settings, scale_out_settings,
                     star_specs, strategy_names, token_counts)
from ..names import DEFAULT_STAR_LAYOUT, RESULTS_DIRECTORY

if TYPE_CHECKING:
    from ..attention.spec import StrategySpec
    from ..session import Session


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="star against ring and dense: latency and memory over context lengths",
        description="Runs each strategy at each context length on the ranks it is launched with "
                    "(random token ids; lengths that do not fit in memory are skipped), prints a "
                    "table, and writes JSON and a PNG plot.")
    bench.add_argument("--attn", type=strategy_names, default="star,ring,dense",
                       help="strategies, comma-separated (default: all)")
    add_lengths_flag(bench, default="32K,64K,128K,256K,512K,1M")
    add_query_tokens_flag(bench)
    bench.add_argument("--output", type=Path, default=None,
                       help=f"JSON results (default: {RESULTS_DIRECTORY}/e2e_<model>_<ranks>ranks.json, or "
                            "job_... with --job); the plot goes beside it as .png")
    bench.add_argument("--job", type=positive, default=None, metavar="REQUESTS",
                       help="measure a job of REQUESTS requests instead: one at a time against each context "
                            "encoded once for its questions (--questions-per-context); requests per hour, "
                            "output tokens per second, each request's latency")
    # None until given, so that one given without --job is refused rather than ignored.
    bench.add_argument("--questions-per-context", type=positive, default=None, metavar="Q",
                       help="with --job: questions asked of each context (default: 1)")
    bench.add_argument("--batch", type=positive, default=None, metavar="N",
                       help="with --job: also the job with up to N requests decoding together (default: 1, not)")
    bench.add_argument("--mix", type=counts_list, default=None, metavar="N,N,...",
                       help="with --job: one job of requests of every --lengths length at once, in these "
                            "proportions (e.g. 12,3,1), served as run serves them, each way of "
                            "--hosts-per-request; each request's hosts, latency and time to first token, each "
                            "rank's busy fraction, and a timeline")
    add_scale_out_flags(bench, default="all", several=True)
    bench.add_argument("--replot", type=Path, default=None, metavar="JSON",
                       help="only draw the plot of an earlier result (e.g. made where matplotlib is missing)")
    add_model_flags(bench, model="llama-3.1-8b")
    add_star_flags(bench, grid=True)
    add_generation_flags(bench, max_new_tokens=32, sized=False)


def check(args: argparse.Namespace) -> None:
    """Refuses the flags of a job without --job; turns --lengths into a list, and makes the
    settings: args.runtime and args.specs, the strategies to measure."""
    job_only = [flag for flag, value in (("--questions-per-context", args.questions_per_context),
                                         ("--batch", args.batch)) if value is not None]
    if job_only and args.job is None:
        raise ValueError(f"{' and '.join(job_only)} take{'s' if len(job_only) == 1 else ''} effect only with "
                         "--job REQUESTS")
    args.questions_per_context, args.batch = args.questions_per_context or 1, args.batch or 1
    args.runtime = runtime_settings(args)
    args.specs, args.lengths = star_specs(args, args.attn), token_counts(args.lengths)
    args.ways = scale_out_settings(args)
    if args.mix is None:
        if args.hosts_per_request != ["all"] or args.max_block is not None:
            raise ValueError("--hosts-per-request and --max-block take effect only with --mix (a job of mixed lengths)")
        return
    if args.job is None:
        raise ValueError("--mix takes effect only with --job REQUESTS")
    if len(args.mix) != len(args.lengths):
        raise ValueError(f"--mix gives {len(args.mix)} proportions for {len(args.lengths)} --lengths")
    if len(args.specs) != 1:
        raise ValueError("a job of mixed lengths measures one strategy: give one --attn and one star layout")
    if args.questions_per_context > 1:
        raise ValueError("a job of mixed lengths asks one question of each context: no --questions-per-context")


def main(args: argparse.Namespace) -> int:
    from ..attention.backends import backend_for
    from ..json_file import write_json
    from ..measure import speed
    from ..measure.plots import plot_bench, plot_job, plot_mixed_job
    from ..measure.results import environment
    from ..session import Session

    if args.replot is not None:
        earlier = json.loads(args.replot.read_text())
        plot = (plot_mixed_job if "mix" in earlier else plot_job if earlier["rows"] and "mode" in earlier["rows"][0]
                else plot_bench)
        if not plot(earlier, args.replot.with_suffix(".png")):
            raise ValueError("--replot needs matplotlib: pip install matplotlib")
        print(f"saved {args.replot.with_suffix('.png')}")
        return 0
    session = Session(args.runtime)
    measured = environment(session.dist.world, session.device, ["python", "-m", "star_engine"])
    name = bench_name(args.model, session.dist.world, [spec for spec in args.specs if spec.attn == "star"],
                      session.hosts.tp)
    if args.job is not None:
        name = name.replace("e2e_", "job_", 1)
    output = args.output or Path(RESULTS_DIRECTORY, f"{name}.json")
    session.say(f"star_engine bench: {', '.join(args.attn)} at {len(args.lengths)} lengths on "
                f"{session.dist.world} rank(s); results to {output}")
    if args.mix is not None:
        return _mixed_job(args, session, measured, output.with_name(output.name.replace("job_", "job_mixed_", 1)
                                                                    if args.output is None else output.name))
    if args.job is not None:
        return _job(args, session, measured, output)

    def write(rows: list[dict], ceilings: dict, complete: bool) -> dict:
        result = {**measured, "model": args.model,
                  "dtype": str(session.model.embed.weight.dtype).replace("torch.", ""),
                  "attention_backend": backend_for(session.device, session.model.embed.weight.dtype),
                  "strategies": [spec.as_dict() for spec in args.specs], "query_tokens": args.query_tokens,
                  "new_tokens": args.max_new_tokens, "complete": complete, **ceilings, "rows": rows,
                  "speedups": speed.speedups(rows)}
        if session.dist.rank == 0:
            write_json(output, result)
        return result

    rows, ceilings = speed.run_benchmark(session.model, session.comm, session.dist, args.specs,
                                             session.calibration, args.lengths,
                                             args.query_tokens, args.max_new_tokens, args.runtime.cuda_graph,
                                             session.say,
                                             on_row=lambda rows, ceilings: write(rows, ceilings, complete=False))
    result = write(rows, ceilings, complete=True)
    if session.dist.rank == 0:
        print(speed.table(rows))
        for s in result["speedups"]:
            parts = [f"{k.replace('over_', 'over ')} {v:.2f}x" for k, v in s.items() if k.startswith("over_")]
            if parts:
                print(f"{s['star']} at {s['context']} tokens: {', '.join(parts)} (time to first token)")
        plotted = plot_bench(result, output.with_suffix(".png"))
        session.say(f"saved {output}" + (f" and {output.with_suffix('.png')}" if plotted else
                                         " (no plot: matplotlib is not installed)"))
    return 0


def _job(args: argparse.Namespace, session: Session, measured: dict, output: Path) -> int:
    from ..json_file import write_json
    from ..measure import speed
    from ..measure.plots import plot_job

    rows, result = [], {}
    for spec in args.specs:
        for length in args.lengths:
            rows += speed.run_job(session.model, session.comm, session.dist, spec, session.calibration, length,
                                      args.job,
                                      args.questions_per_context, args.query_tokens, args.max_new_tokens,
                                      args.runtime.cuda_graph, session.say, batch=args.batch)
            result = {**measured, "model": args.model, "query_tokens": args.query_tokens,
                      "new_tokens": args.max_new_tokens, "rows": rows}
            if session.dist.rank == 0:  # after every length, so that a stopped run keeps them
                write_json(output, result)
    if session.dist.rank == 0:
        print(speed.job_table(rows))
        plotted = plot_job(result, output.with_suffix(".png"))
        session.say(f"saved {output}" + (f" and {output.with_suffix('.png')}" if plotted else
                                         " (no plot: matplotlib is not installed)"))
    return 0


def _mixed_job(args: argparse.Namespace, session: Session, measured: dict, output: Path) -> int:
    from ..json_file import write_json
    from ..measure.mixed_job import comparison, mix_phrase, mixed_lengths, run_mixed_job, table
    from ..measure.plots import plot_mixed_job

    lengths = mixed_lengths(args.lengths, args.mix, args.job)
    session.say(f"a job of {len(lengths)} requests: {mix_phrase(lengths, args.lengths)}, {args.max_new_tokens} new "
                f"tokens each, batch {args.batch}")
    rows = run_mixed_job(session, args.specs[0], lengths, args.query_tokens, args.max_new_tokens, args.batch,
                         args.ways, session.say)
    if session.dist.rank == 0:  # the answers came back to rank 0
        result = {**measured, "model": args.model, "strategy": args.specs[0].as_dict(), "lengths": args.lengths,
                  "mix": args.mix, "query_tokens": args.query_tokens, "new_tokens": args.max_new_tokens,
                  "batch": args.batch, "calibration": session.calibration.source, "rows": rows,
                  "auto_against_all": comparison(rows)}
        write_json(output, result)
        print(table(rows))
        if result["auto_against_all"]:
            c = result["auto_against_all"]
            print(f"auto against all: {c['requests_per_hour_x']:.2f}x the requests per hour; {c['shortest']}-token "
                  f"requests' latency {c['shortest_latency_median_x']:.2f}x (median), "
                  f"{c['shortest_latency_p90_x']:.2f}x (90th percentile); {c['longest']}-token requests' time to "
                  f"first token {c['longest_ttft_median_x']:.2f}x (median)")
        plotted = plot_mixed_job(result, output.with_suffix(".png"))
        session.say(f"saved {output}" + (f" and {output.with_suffix('.png')}" if plotted else
                                         " (no plot: matplotlib is not installed)"))
    return 0


def bench_name(model: str, ranks: int, stars: list[StrategySpec], tp: int = 1) -> str:
    """The default name of a bench result; a star layout other than the default gets a name
    of its own (e.g. ..._8ranks_anchor0.25), so that runs sit side by side; several star
    layouts measured together, ..._layouts."""
    layout = ""
    if len(stars) > 1:
        layout = "_layouts"
    elif stars:
        star = stars[0]
        settings = (("block", star.block_size), ("blocks", star.blocks), ("anchor", star.anchor_fraction),
                    ("anchortokens", star.anchor_tokens))
        layout = "".join(f"_{key}{value:g}" for key, value in settings if value is not None)
        if star.layout != DEFAULT_STAR_LAYOUT:
            layout += f"_{star.layout}"
    return f"e2e_{model.replace('/', '_')}_{ranks}ranks{f'_tp{tp}' if tp > 1 else ''}{layout}"
