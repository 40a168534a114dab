"""`plan`: how many GPUs, and which strategy and star layout, for a context: predicted
phase 1, time to first token, time per output token and memory per rank, from the model's
shape and a device's measured rates; `--calibrate` measures them on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..flags import (add_generation_flags, add_lengths_flag, add_model_flags, add_query_tokens_flag,
                     add_scale_out_flags, add_star_flags, counts_list, positive, runtime_settings, scale_out_settings,
                     star_specs, strategy_names, token_counts)
from ..names import RESULTS_DIRECTORY, STAR_LAYOUTS


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan", help="predict time and memory per strategy and GPU count; recommend a layout",
        description="Predicts, without running the model, each strategy's phase-1 time, time to first token, "
                    "time per output token and memory per rank for a context on 1 or more GPUs, from the "
                    "model's shape and a calibration (a device's measured rates), and recommends the fastest "
                    "layout that fits in memory or the fewest GPUs that meet --ttft-target. With --calibrate it "
                    "measures this machine's rates instead (launch it like any job, on the ranks to measure).")
    add_lengths_flag(plan, default="128K")
    plan.add_argument("--gpus", default="1,2,4,8", help="GPU counts to consider, comma-separated (default: 1,2,4,8)")
    plan.add_argument("--gpus-per-node", type=positive, default=None,
                      help="GPUs of one node; jobs on more go over the network rate of the calibration "
                           "(default: all on one node)")
    plan.add_argument("--attn", type=strategy_names, default="star,ring,dense",
                      help="strategies, comma-separated (default: star,ring,dense)")
    add_query_tokens_flag(plan)
    add_generation_flags(plan, max_new_tokens=32, sized=False)
    plan.add_argument("--memory-gib", type=float, default=None,
                      help="memory per GPU to plan within (default: the calibrated device's)")
    plan.add_argument("--ttft-target", type=float, default=None, metavar="SECONDS",
                      help="recommend the fewest GPUs whose time to first token is at most this")
    plan.add_argument("--calibration", type=Path, default=None,
                      help="rates measured by --calibrate (default: $STAR_ENGINE_CALIBRATION, else the shipped "
                           "H200 calibration)")
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine's rates with the model (random weights are as good) and write "
                           "them to --output")
    plan.add_argument("--job", type=positive, default=None, metavar="REQUESTS",
                      help="predict a job of REQUESTS requests instead, of the --lengths in the proportions of "
                           "--mix, served as run serves them with each way of --hosts-per-request (as bench "
                           "--job --mix measures it): its wall time, requests per hour, and the hosts each "
                           "length gets, on each --gpus count")
    plan.add_argument("--mix", type=counts_list, default=None, metavar="N,N,...",
                      help="with --job: the proportions of the --lengths (default: equal)")
    plan.add_argument("--batch", type=positive, default=1, metavar="N",
                      help="with --job: requests each group decodes together (default: 1)")
    plan.add_argument("--questions-per-context", type=positive, default=1, metavar="Q",
                      help="with --job and one --lengths: requests come Q to a context, which is encoded once "
                           "and, for those decoding together, read once a step (default: 1)")
    add_scale_out_flags(plan, default="auto,all", several=True)
    plan.add_argument("--output", type=Path, default=None,
                      help="predictions as JSON (default: none), or with --calibrate the calibration (default: "
                           f"{RESULTS_DIRECTORY}/calibration_<device>.json); a calibration there already keeps the "
                           "rates this job cannot measure (one node's link, the network)")
    # One rank per host: tensor parallelism is in neither the predictions nor the calibration.
    add_model_flags(plan, model="llama-3.1-8b", tensor_parallel=False)
    add_star_flags(plan, grid=True, layouts=STAR_LAYOUTS)


def check(args: argparse.Namespace) -> None:
    """Turns the lists into lists, and makes the settings: args.runtime and args.specs."""
    args.runtime = runtime_settings(args)
    if args.calibrate:
        return
    args.lengths, args.gpu_counts = token_counts(args.lengths), token_counts(args.gpus, "--gpus")
    args.specs = star_specs(args, args.attn)
    if args.job is None:
        if args.mix is not None or args.questions_per_context > 1:
            flag = "--mix" if args.mix is not None else "--questions-per-context"
            raise ValueError(f"{flag} takes effect only with --job REQUESTS")
        return
    if args.questions_per_context > 1 and len(args.lengths) > 1:
        raise ValueError("--questions-per-context takes one --lengths value (its contexts' length)")
    args.ways = scale_out_settings(args)
    args.mix = args.mix or [1] * len(args.lengths)
    if len(args.mix) != len(args.lengths):
        raise ValueError(f"--mix gives {len(args.mix)} proportions for {len(args.lengths)} --lengths")
    if len(args.specs) != 1:
        raise ValueError("a job is predicted for one strategy: give one --attn and one star layout")


def main(args: argparse.Namespace) -> int:
    if args.calibrate:
        return _calibrate(args)
    import torch

    from ..attention.spec import StrategySpec
    from ..checkpoint import load_config
    from ..costs import Calibration
    from ..json_file import write_json
    from ..launch.launcher import env_rank

    if env_rank() != 0:
        return 0  # a prediction needs one process: under a launcher, rank 0 makes it

    from ..prediction import predict, recommend

    config = load_config(args.model)
    calibration = Calibration.load(args.calibration)
    element_size = getattr(torch, args.dtype or "bfloat16").itemsize
    if args.job is not None:
        return _job(args, config, calibration, element_size)
    memory = args.memory_gib * 2**30 if args.memory_gib else calibration.memory_bytes
    # On one GPU every strategy is dense (one block, no ring): one line says it.
    predictions = [predict(config, spec, gpus, context, args.query_tokens, args.max_new_tokens, calibration,
                           element_size, args.gpus_per_node)
                   for context in args.lengths for gpus in args.gpu_counts
                   for spec in (args.specs if gpus > 1 else [StrategySpec("dense")])]
    print(f"{args.model} on {calibration.device} ({calibration.source})")
    print(_table(predictions, memory))
    for context in args.lengths:
        mine = [p for p in predictions if p.context == context]
        print(recommend(mine, memory, args.ttft_target))
    left_out = sorted({cost for p in predictions for cost in p.left_out})
    if left_out:
        print(f"not in these predictions, for the calibration has no rate for it: {', '.join(left_out)}")
    if args.output:
        write_json(args.output, {"predicted_on": _predicted_on(), "model": args.model,
                                 "calibration": calibration.__dict__, "predictions": [p.__dict__ for p in predictions]})
        print(f"saved {args.output}", file=sys.stderr)
    return 0


def _job(args: argparse.Namespace, config, calibration, element_size: int) -> int:
    from ..json_file import write_json
    from ..measure.job_prediction import predict_job
    from ..measure.mixed_job import mix_phrase, mixed_lengths
    from ..measure.text_table import text_table

    lengths = mixed_lengths(args.lengths, args.mix, args.job)
    print(f"{args.model} on {calibration.device} ({calibration.source}): {len(lengths)} requests, "
          f"{mix_phrase(lengths, args.lengths)}, {args.max_new_tokens} new tokens each, batch {args.batch}"
          + (f", {args.questions_per_context} questions a context" if args.questions_per_context > 1 else ""))
    jobs = [predict_job(config, args.specs[0], gpus, lengths, args.query_tokens, args.max_new_tokens, args.batch,
                        way, calibration, element_size, args.gpus_per_node, args.questions_per_context)
            for gpus in args.gpu_counts for way in args.ways]
    shortest = str(min(lengths))
    print(text_table([{"gpus": j["hosts"], "hosts/request": j["hosts_per_request"], "wall s": f"{j['wall_s']:.1f}",
                       "req/hour": f"{j['requests_per_hour']:.0f}",
                       "shortest's latency s": "{median:.1f} / {p90:.1f}".format(**j["latency_s_by_length"][shortest]),
                       "hosts by length": ", ".join(f"{n}: {h}" for n, h in j["hosts_by_length"].items())}
                      for j in jobs], ["gpus", "hosts/request", "wall s", "req/hour", "shortest's latency s",
                                       "hosts by length"],
                     left={"hosts/request", "hosts by length"})
          + f"\n(the {shortest}-token requests' latency from the job's start: median / 90th percentile)")
    if args.output:
        write_json(args.output, {"predicted_on": _predicted_on(), "model": args.model, "calibration": calibration.__dict__,
                                 "lengths": args.lengths, "mix": args.mix, "batch": args.batch,
                                 "questions_per_context": args.questions_per_context, "jobs": jobs})
        print(f"saved {args.output}", file=sys.stderr)
    return 0


def _predicted_on() -> dict:
    """Where and when a prediction was made (commit, date, command): the machine it ran on,
    not the one it predicts."""
    import torch

    from ..measure.results import environment

    return environment(1, torch.device("cpu"), ["python", "-m", "star_engine"])


def _table(predictions: list, memory: float | None) -> str:
    from ..measure.text_table import text_table

    lines = [{"context": p.context, "gpus": p.gpus, "strategy": p.label, "phase1 s": f"{p.phase1_s:.3f}",
              "ttft s": f"{p.ttft_s:.3f}", "tpot ms": f"{p.tpot_s * 1e3:.2f}",
              "GiB/rank": f"{p.memory_bytes / 2**30:.1f}",
              "": "over memory" if memory and p.memory_needed_bytes > memory else ""}
             for p in predictions]
    return text_table(lines, ["context", "gpus", "strategy", "phase1 s", "ttft s", "tpot ms", "GiB/rank", ""],
                      left={"strategy", ""})


def _calibrate(args: argparse.Namespace) -> int:
    from ..costs import Calibration
    from ..measure.calibration import measure
    from ..session import Session

    # A calibration there already (another node count's) keeps the rates this job cannot
    # measure; anything else there is refused before the measuring starts.
    session = Session(args.runtime)
    earlier = (Calibration.load(args.output) if session.dist.rank == 0 and args.output and args.output.exists()
               else None)
    session.say("star_engine plan --calibrate: measuring phase 1, memory, the link and gather_merge ...")
    calibration = measure(session.model, args.model, session.comm, session.dist, session.say)
    if session.dist.rank == 0:
        device = calibration.device.replace(" ", "-").lower()
        output = args.output or Path(RESULTS_DIRECTORY, f"calibration_{device}.json")
        if earlier is not None:
            calibration, taken = calibration.filled_from(earlier)
            if taken:
                session.say(f"  kept from {output}: {', '.join(taken)}")
        calibration.save(output)
        session.say(f"saved {output}; use it with --calibration {output} or STAR_ENGINE_CALIBRATION={output}")
    return 0
