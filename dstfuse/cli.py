"""The `dstfuse` command line: parse, dispatch, and turn user errors into
one line on stderr with a non-zero exit.

Each subcommand lives in `dstfuse.commands.<name>` and provides `HELP`,
`add_arguments(parser)` and `run(args) -> int`. Global options (`-v`) are
accepted before or after the subcommand (`dstfuse -v check` and
`dstfuse check -v` are the same); their counts add up. A `UserError` from `run`
prints ``dstfuse <command>: <message>`` and exits 1; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

COMMANDS = ("export", "mount", "umount", "reload", "status", "check", "verify", "keygen")


def _command_module(name: str):
    return importlib.import_module(f"dstfuse.commands.{name}")


#: Where `-v` given after the subcommand is counted (added to `verbose`).
_VERBOSE_AFTER = "verbose_after_command"


def _add_global_options(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        dest=dest,
        action="count",
        default=0,
        help="more log output (-vv for debug)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dstfuse", description="Distributed network block storage presented through FUSE."
    )
    _add_global_options(parser, "verbose")
    parser.add_argument("--version", action="version", version=f"dstfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _command_module(name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        # A subparser fills its own namespace, which would overwrite the
        # count given before the command: count separately, add in main.
        _add_global_options(command_parser, _VERBOSE_AFTER)
        module.add_arguments(command_parser)
        command_parser.set_defaults(
            run=module.run, log_level=getattr(module, "LOG_LEVEL", logging.WARNING)
        )
    return parser


def configure_logging(base_level: int, verbosity: int) -> None:
    """Daemons (export, mount) set LOG_LEVEL = INFO in their module so that
    reconnects and state changes reach the journal; -v lowers the level."""
    level = max(logging.DEBUG, base_level - 10 * verbosity)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, _VERBOSE_AFTER, 0)
    configure_logging(args.log_level, args.verbose)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"dstfuse {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
