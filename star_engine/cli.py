"""Command line: `python -m star_engine {run,demo,bench,eval,plan}`, one process per rank under
mpirun or srun. Parses, checks the arguments once, and hands them to the command's module
(star_engine/commands/)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from types import ModuleType

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m star_engine",
        description="Long-context LLM inference over many ranks with Star Attention, beside the "
                    "ring and dense baselines. Launch one process per GPU: mpirun -np N python -m "
                    "star_engine ...")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .launch.ending import job_problem, leave_together, run_guarded
    from .launch.launcher import env_rank

    parser = build_parser()
    speaks = env_rank() == 0  # every rank parses the same arguments; one of them speaks
    try:
        with contextlib.redirect_stdout(sys.stdout if speaks else io.StringIO()), \
                contextlib.redirect_stderr(sys.stderr if speaks else io.StringIO()):
            args = parser.parse_args(argv)  # usage, help and argument errors: once per job
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
        if code:
            leave_together()
        return code
    command = COMMANDS[args.command]
    problem = job_problem(lambda: _problem(command, args))
    if problem is not None:
        if speaks:
            print(f"star_engine: {problem}", file=sys.stderr, flush=True)
        leave_together()
        return 2
    return run_guarded(lambda: command.main(args))


def _problem(command: ModuleType, args: argparse.Namespace) -> str | None:
    """What this rank finds wrong with the job before any work (the command's check, the
    model named first); None if nothing."""
    try:
        command.check(args)
    except ValueError as exc:
        return str(exc)
    return None
