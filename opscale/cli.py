"""The ``opscale`` command line.

Each sub-command lives in its own module under :mod:`opscale.commands` and exposes
``add_parser(subparsers)``, which registers its parser and sets ``func`` (a callable taking the parsed
namespace and returning an exit code). Heavy imports (torch, SB3) happen inside ``func`` so that
``opscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from opscale.version import __version__

#: Sub-command modules, in the order ``opscale --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "trace",
    "train",
    "costmodel",
    "simulate",
    "evaluate",
    "experiment",
    "env",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opscale",
        description="Operator-level autoscaling of LLM serving: simulator, environments, autoscalers.",
    )
    parser.add_argument("--version", action="version", version=f"opscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"opscale.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as error:
        # Bad input is reported as one clear line, not a traceback.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"opscale {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
