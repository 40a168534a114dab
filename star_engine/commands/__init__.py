"""One module per subcommand, each with add_parser(subparsers), check(args) (validates the
arguments, the model they name first, and turns them into the values and typed settings
the command uses, raising ValueError) and main(args) -> exit code. Only the commands (and
flags.py) read the command line: the session and the engine take the settings."""

from . import bench, demo, eval, plan, run

COMMANDS = {"run": run, "demo": demo, "bench": bench, "eval": eval, "plan": plan}
