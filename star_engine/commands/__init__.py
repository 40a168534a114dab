"""One module per subcommand, each with add_parser(subparsers), check(args) (validates the
arguments and turns them into the values the command uses, raising ValueError) and
main(args) -> exit code."""

from . import bench, demo, eval, plan, run

COMMANDS = {"run": run, "demo": demo, "bench": bench, "eval": eval, "plan": plan}
