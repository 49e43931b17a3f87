"""``fbp check``: run the gradient checker over the model zoo and print one table.

One row per model x loss x dtype, printed as each check finishes; the full report
of every failure follows the table, and the exit status is 1 if any check failed
(2 for an unknown name). Each check covers the per-example hooks a clipped train
step runs too (``fbp.check.hooks``); the last line counts the layers whose hooks
were checked. Models with Dropout are checked with a key, so with a mask.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from fbp import zoo
from fbp.check import check_gradients
from fbp.layers.base import describe

DTYPES = {"float32": (jnp.float32,), "float64": (jnp.float64,), "both": (jnp.float32, jnp.float64)}
HEADER = ("model", "loss", "dtype", "rows", "worst rel err", "result")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``check`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "check",
        help="check every hand-written backward in the model zoo against jax.grad and finite differences",
        description=(
            "Build each model of the zoo (fbp/zoo.py) with its loss and a small random batch, run "
            "fbp.check_gradients (autodiff, finite differences, per-example, and every layer's per-example "
            "hooks against jax.vmap of its own backward), and print one table: "
            "model, loss, dtype, rows checked, worst relative error, ok/FAIL. Failing reports follow "
            "in full. Rows appear as each check finishes. Exit status: 0 all ok, 1 a check failed, 2 an unknown "
            "model name."
        ),
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="both",
        help="precision of params and inputs; tolerances follow it (default: both)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for params, data and check directions (default: 0)")
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help=(
            "zoo entry to check, e.g. 'cnn/cross-entropy', or a model name for all its losses, e.g. "
            "'mlp-relu'; repeat the option or give a comma list (default: all; see --list)"
        ),
    )
    parser.add_argument("--list", action="store_true", help="list the zoo's names and exit")
    return parser


class _RowPrinter:
    """Prints the table one row at a time, as each check finishes: widths fixed up front from the names."""

    def __init__(self, names: list[str], losses: list[str], dtypes: list[str]):
        self.widths = [max(len(HEADER[0]), *map(len, names)), max(len(HEADER[1]), *map(len, losses)),
                       max(len(HEADER[2]), *map(len, dtypes)), len(HEADER[3]), len(HEADER[4]), len(HEADER[5])]
        self.row(HEADER)

    def row(self, cells: tuple[str, ...]) -> None:
        print("  ".join(cell.ljust(w) for cell, w in zip(cells, self.widths)).rstrip(), flush=True)


def _check_one(entry: zoo.ZooEntry, dtype, seed: int):
    """(checked dtype, rows checked, worst relative error, ok, full report text, layers whose hooks were checked)
    for one entry."""
    with jax.enable_x64(dtype == jnp.float64):
        model, loss, params, x, y = entry.example(seed=seed, dtype=dtype)
        # a key, as a train step passes one: a model with Dropout is checked with a mask (others ignore it)
        report = check_gradients(model, loss, params, x, y, key=jax.random.PRNGKey(seed), seed=seed)
    worst = max((row.max_rel_err for row in report.rows), default=0.0)
    return report.dtype, len(report.rows), worst, report.ok, str(report), report.hook_layers


def run(args: argparse.Namespace) -> int:
    """Check the selected zoo entries; print the table; 0 if all pass, 1 if any fails, 2 on a bad name."""
    if args.list:
        for name, entry in zoo.ZOO.items():
            print(f"{name:32s} {describe(entry.model)} + {type(entry.loss).__name__}")
        return 0
    names = [name.strip() for option in args.model or () for name in option.split(",") if name.strip()]
    try:
        entries = zoo.select(names)
    except KeyError as error:
        print(f"fbp check: {error.args[0]}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows, failures, hook_layers = [], [], 0
    printer = _RowPrinter([name.split("/")[0] for name in entries], [type(e.loss).__name__ for e in entries.values()],
                          [jnp.dtype(dtype).name for dtype in DTYPES[args.dtype]])
    for dtype in DTYPES[args.dtype]:
        dtype_name = jnp.dtype(dtype).name
        for name, entry in entries.items():
            try:
                checked, count, worst, ok, text, hooked = _check_one(entry, dtype, args.seed)
            except Exception as error:  # noqa: BLE001 - a crash is a failed check, reported with the rest
                checked, count, worst, ok, hooked = dtype_name, 0, float("nan"), False, 0
                text = f"{type(error).__name__}: {error}"
            hook_layers += hooked
            row = (name.split("/")[0], type(entry.loss).__name__, checked, str(count), f"{worst:.2e}")
            rows.append((*row, "ok" if ok else "FAIL"))
            printer.row(rows[-1])
            if not ok:
                failures.append(f"== {name} ({dtype_name}) ==\n{text}")
    seconds = time.perf_counter() - start
    if failures:
        print(f"\n{len(failures)} of {len(rows)} checks FAILED ({seconds:.1f} s)\n")
        print("\n\n".join(failures))
        return 1
    print(f"\nall {len(rows)} checks ok, with the per-example hooks of {hook_layers} layers ({seconds:.1f} s)")
    return 0
