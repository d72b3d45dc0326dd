"""The `fssam` command: sub-commands that compose (predict, export, compare, ...), one module each
in fssam.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fssam.commands import COMMANDS
from fssam.commands.common import run


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssam", description="FSSAM few-shot segmentation: run, export, serve, measure.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fssam.commands.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    try:
        parser = make_parser()  # imports every command (and torch): Ctrl-C here is still one line
    except KeyboardInterrupt:
        print("fssam: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
