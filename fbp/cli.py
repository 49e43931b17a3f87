"""The ``fbp`` command: a thin argparse front end over the public API.

Each subcommand lives in ``fbp/commands/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("check", "train", "bench", "explain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fbp", description="fbp: hand-written backprop, checked against JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fbp.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"fbp.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
