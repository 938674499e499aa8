"""`dforge`: one command line over the toolkit.

Each subcommand lives in its own module in this package with two functions:
``register(subparsers)`` (adds its parser; imports only argparse, so ``dforge --help`` is fast) and
``run(args) -> int``. Heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module in this package
COMMANDS = {"demo": "demo", "train": "train", "sample": "sample", "datasets": "datasets", "eval": "eval", "viz": "viz"}


class UserError(Exception):
    """Bad input from the user: printed as one clear message, no traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dforge", description="Diffusion Forge: train, sample, guide, evaluate and share diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"dforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
