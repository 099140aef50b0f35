"""The `deltatune` command line: one module per command, listed in ``COMMANDS``.

A command module has ``NAME``, ``HELP`` (and optionally ``DESCRIPTION``), ``add_arguments(parser)`` and
``run(args) -> int``; adding a command is one module and one line here. The engine (transformers) and the
report (matplotlib) are imported inside the commands that need them, so `--help` costs no more than importing
the package. Every DeltatuneError ends the program with a one-line message and exit code 2, like a usage error.
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings

from deltatune.errors import DeltatuneError
from . import analyze, bench, demo, eval, export, methods, report, serve, sweep, tasks, train
from .common import EXIT_USAGE, Parser, parse_sets, parse_value, seeds as _seeds, slug as _slug  # noqa: F401
from .demo import DEMO_METHODS, demo_argv  # noqa: F401
from .train import print_summary as _print_summary  # noqa: F401

COMMANDS = [methods, tasks, train, eval, export, bench, sweep, report, demo, analyze, serve]
cmd_bench = bench.run  # noqa: E305  (the name tests and scripts call)


def build_parser() -> Parser:
    parser = Parser(prog="deltatune", description="Parameter-efficient fine-tuning: every method is a delta "
                    "at a site, combined in a certain way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=getattr(command, "DESCRIPTION", None))
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "deltatune " + shlex.join(argv)  # recorded in the bench report
    # Library warnings (e.g. truncated inputs) as one line each instead of file:line plus source;
    # restored on the way out, since tests call main() inside their own process.
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"deltatune {args.command}: warning: {message}\n"
    try:
        return args.run(args) or 0
    except DeltatuneError as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        print(f"deltatune {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deltatune methods | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = previous_format
