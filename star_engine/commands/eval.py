"""`eval`: star against dense on RULER-style tasks at exact token lengths; every method
answers the same samples; a table, JSON and a plot, resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..flags import (add_generation_flags, add_lengths_flag, add_model_flags, add_star_flags, positive,
                     runtime_settings, star_specs, strategy_names, token_counts)
from ..measure.tasks import TASKS
from ..names import RESULTS_DIRECTORY


def add_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval", help="accuracy of star against dense on synthetic long-context tasks",
        description="Generates RULER-style tasks from the seed at exactly the lengths asked for (in the "
                    "model's tokens and chat template), has every method answer the same samples, "
                    "scores them, prints a table (star's accuracy also relative to dense) and writes "
                    "JSON and a plot.")
    evaluate.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: all: {', '.join(TASKS)})")
    add_lengths_flag(evaluate, default="1K,2K,4K", of="prompt")
    evaluate.add_argument("--samples", type=positive, default=10, help="samples per task and length (default: 10)")
    evaluate.add_argument("--attn", type=strategy_names, default="star,dense",
                          help="strategies, comma-separated; star once for each layout of the grid its flags "
                               "give (default: star,dense)")
    evaluate.add_argument("--batch", type=positive, default=1, metavar="N",
                          help="each method answers up to N samples at once, decoding them together: faster, and "
                               "the same answers but for the rounding of a batch's products in bfloat16 (default: 1)")
    evaluate.add_argument("--seed", type=int, default=0, help="first sample's seed (default: 0)")
    evaluate.add_argument("--output", type=Path, default=None,
                          help=f"JSON results (default: {RESULTS_DIRECTORY}/eval_<model>.json); the table and the "
                               "plot go beside it")
    evaluate.add_argument("--resume", action="store_true",
                          help="keep what --output already holds (a stopped run's results) and measure only the "
                               "(task, length) cells it lacks or holds in part; same model, seed, samples and "
                               "--max-new-tokens")
    add_model_flags(evaluate)
    add_star_flags(evaluate, grid=True, blocks=4)
    add_generation_flags(evaluate, max_new_tokens=None, sized=False,
                         meaning="tokens each answer may take at most: a task's own number (32; 48 to 96 for the "
                                 "tasks whose answers are lists), or N where that is smaller "
                                 "(default: each task's own)")


def check(args: argparse.Namespace) -> None:
    """Turns --tasks and --lengths into lists, and makes the settings: args.runtime and
    args.specs, the methods."""
    args.runtime = runtime_settings(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
    args.tasks, args.lengths, args.specs = tasks, token_counts(args.lengths), star_specs(args, args.attn)


def main(args: argparse.Namespace) -> int:
    from ..json_file import write_json
    from ..measure import accuracy
    from ..measure.plots import plot_eval
    from ..measure.results import environment
    from ..session import Session

    session = Session(args.runtime)
    measured = environment(session.dist.world, session.device, ["python", "-m", "star_engine"])
    name = f"eval_{Path(args.model).stem if Path(args.model).exists() else args.model}"
    output = args.output or Path(RESULTS_DIRECTORY, f"{name}.json")
    session.say(f"star_engine eval: {len(args.tasks)} tasks x {len(args.lengths)} lengths x {args.samples} samples, "
                f"{len(args.specs)} methods; results to {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    header = {**measured, "model": args.model, "samples_per_cell": args.samples, "seed": args.seed,
              "max_new_tokens": args.max_new_tokens, "batch": args.batch}
    earlier: list[dict] = []
    if args.resume:
        earlier_run = _earlier_eval(output, header) if session.dist.rank == 0 else None
        earlier_run = session.dist.bcast(earlier_run, root=0)
        if earlier_run is not None:
            earlier = earlier_run["rows"]
            # Which runs measured which cells: a resumed file may hold several commits' rows.
            header["earlier_runs"] = [*earlier_run.get("earlier_runs", []),
                                      {k: earlier_run[k] for k in ("commit", "date", "command") if k in earlier_run}]

    def write(rows: list[dict], complete: bool) -> str:
        summary = accuracy.summarise(rows)
        result = {**header, "complete": complete, "summary": summary, "rows": rows}
        write_json(output, result)
        text = accuracy.table(summary)
        note = "" if complete else "incomplete: the run was stopped before every cell was measured\n"
        output.with_suffix(".txt").write_text(f"{header['command']}\n{args.samples} samples per cell\n{note}\n{text}\n")
        return text

    rows = accuracy.run_evaluation(session.model, session.tokenizer, session.comm, session.dist, args.tasks,
                                     args.lengths, args.samples, args.specs, session.calibration, args.seed,
                                     session.say, max_new_tokens=args.max_new_tokens, batch=args.batch,
                                     on_cell=lambda partial: write(partial, complete=False), earlier=earlier)
    if session.dist.rank == 0:
        print(write(rows, complete=True))
        plotted = plot_eval(accuracy.summarise(rows), f"{args.model}: accuracy, {args.samples} samples per cell",
                                  output.with_suffix(".png"))
        session.say(f"saved {output}, the table as {output.with_suffix('.txt')}"
                    + (f" and the plot as {output.with_suffix('.png')}" if plotted else ""))
    return 0


def _earlier_eval(output: Path, header: dict) -> dict | None:
    """The results in `output` that a resumed run may keep, or None if there are none."""
    if not output.exists():
        return None
    try:
        earlier = json.loads(output.read_text())
    except ValueError as exc:
        raise ValueError(f"--resume: {output} is not JSON ({exc})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
        raise ValueError(f"--resume: {output} is not an eval result (no rows)")
    for key in ("model", "seed", "samples_per_cell", "max_new_tokens"):  # a file without the cap had none
        if earlier.get(key) != header[key]:
            raise ValueError(f"--resume: {output} has {key} {earlier.get(key)!r}, this run {header[key]!r}; "
                             "choose another --output")
    return earlier
