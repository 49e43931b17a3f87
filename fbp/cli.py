"""The ``fbp`` command: a thin argparse front end over the public API.

Each subcommand lives in ``fbp/commands/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``; this file only dispatches and turns errors into exit codes:

* 0: done.
* 1: a known failure (a missing file, a corrupt checkpoint, a failed check, a
  non-finite loss): one line on stderr that says what happened and what to do.
* 2: a usage error (an unknown option, a bad value): the subcommand's usage and the problem.

A traceback is shown only with ``fbp --debug ...`` or the environment variable ``FBP_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

COMMANDS = ("train", "generate", "check", "explain", "bench")
DEBUG_ENV = "FBP_DEBUG"


class UsageError(ValueError):
    """A bad option value found after parsing: exit 2 with the subcommand's usage."""


def _known_failures() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: one line, exit 1."""
    from fbp.training.checkpoint import CheckpointError

    known: list[type[BaseException]] = [ValueError, FileNotFoundError, PermissionError, ImportError,
                                        FloatingPointError, CheckpointError]
    try:
        from fbp.check import GradientCheckError

        known.append(GradientCheckError)
    except ImportError:  # pragma: no cover - the checker is part of fbp
        pass
    return tuple(known)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser], dict]:
    """The ``fbp`` parser, its subparsers by name, and the command modules by name."""
    from fbp import __version__

    parser = argparse.ArgumentParser(prog="fbp", description="fbp: hand-written backprop, checked against JAX.")
    parser.add_argument("--version", action="version", version=f"fbp {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    modules, parsers = {}, {}
    for name in COMMANDS:
        module = importlib.import_module(f"fbp.commands.{name}")
        parsers[name] = module.add_parser(subparsers)
        modules[name] = module
    return parser, parsers, modules


def main(argv: list[str] | None = None) -> int:
    """Run ``fbp`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere: `fbp train --debug` as well as `fbp --debug train`
    argv = [arg for arg in argv if arg != "--debug"]
    parser, parsers, modules = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's: that is where the option belongs
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    prefix = f"fbp {args.command}"
    try:
        return int(modules[args.command].run(args) or 0)
    except UsageError as error:
        parsers[args.command].error(str(error))  # exits 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except _known_failures() as error:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug:
            traceback.print_exc()
        hint = "" if debug else f"; run again with `fbp --debug {args.command} ...` for the traceback"
        print(f"{prefix}: unexpected {type(error).__name__}: {error}{hint}, and please report it", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
