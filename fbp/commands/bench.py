"""``fbp bench``: the train-step benchmark of ``fbp.bench``; this file only registers its options.

``python -m benchmarks.train_step`` in a checkout runs the same harness.
"""

from __future__ import annotations

import argparse

from fbp import bench


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time fbp's train step against raw JAX, Flax NNX and Equinox",
        description=(
            "Time the train step of fbp (manual, autodiff, custom_vjp, per-example, clipped, train_epoch) "
            "against a raw-JAX step, Flax NNX and Equinox (each where installed: pip install flax equinox), "
            f"in interleaved rounds on the default JAX device; write train_step.json and train_step.md under "
            f"--out (default ./{bench.DEFAULT_OUT}/) and print the tables. --quick is a smoke test in seconds."
        ),
    )
    return bench.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with the parsed options: 0 on success, 1 (after one line) when its files cannot be written."""
    return bench.run(args)
