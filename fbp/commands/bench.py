"""``fbp bench``: the train-step benchmark, ``python -m benchmarks.train_step`` under another name.

The harness lives in ``benchmarks/`` of a source checkout, beside the ``fbp``
package, not inside it; this command finds it there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

HARNESS = "benchmarks.train_step"


def _harness() -> ModuleType | None:
    """``benchmarks.train_step``, from the import path or the checkout that holds this fbp; None if neither has it."""
    try:
        return importlib.import_module(HARNESS)
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", HARNESS):
            raise
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "train_step.py").is_file():
        return None
    sys.path.insert(0, str(checkout))
    return importlib.import_module(HARNESS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time fbp's train step against raw JAX, Flax NNX and Equinox (same as python -m benchmarks.train_step)",
        description=(
            "Time the train step of fbp (manual, autodiff, custom_vjp, per-example, clipped, train_epoch) "
            "against a raw-JAX step, Flax NNX and Equinox, in interleaved rounds on the default JAX device; "
            "write benchmarks/out/train_step.json and .md. Needs a source checkout (the benchmarks/ folder)."
        ),
    )
    harness = _harness()
    if harness is not None:
        harness.add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with the parsed options; 2 when the harness is missing."""
    harness = _harness()
    if harness is None:
        print(
            "fbp bench: the benchmark harness (benchmarks/train_step.py) is not here; it ships with a source "
            "checkout of fbp: run `python -m pip install -e .` in a clone, then `fbp bench` there",
            file=sys.stderr,
        )
        return 2
    return harness.run(args)
