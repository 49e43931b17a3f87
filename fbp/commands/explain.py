"""``fbp explain``: print one step of backprop on a tiny MLP, value by value.

The logic lives in ``fbp.explain``; this file only parses options and prints.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fbp import explain


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 3,4,2, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive widths like 3,4,2, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _graph_path(text: str) -> str:
    if Path(text).suffix.lower() not in explain.GRAPH_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a file ending in {', '.join(explain.GRAPH_SUFFIXES)}, got {text!r}")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``explain`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "explain",
        help="print the forward pass, backward pass and update of a tiny MLP, value by value",
        description=(
            "Run one step of gradient descent on a tiny MLP (default 3-4-2 with tanh, MSE loss) and a tiny "
            "random batch, calling each fbp layer's own forward and backward, and print every value: Z and A "
            "per layer with the cache each keeps, then dZ, dA, dW, db in reverse, then W_new = W - lr dW. "
            "--graph also writes the computational graph (forward values and backward gradients)."
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for params and data (default: 0)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the update (default: 0.1)")
    parser.add_argument("--batch", type=_positive_int, default=2, help="examples in the batch (default: 2)")
    parser.add_argument(
        "--activation", choices=sorted(explain.ACTIVATIONS), default="tanh",
        help="nonlinearity after each hidden Dense (default: tanh)",
    )
    parser.add_argument(
        "--sizes", type=_sizes, default=(3, 4, 2), metavar="IN,HIDDEN...,OUT",
        help="layer widths (default: 3,4,2)",
    )
    parser.add_argument("--precision", type=int, default=4, help="digits after the point (default: 4)")
    parser.add_argument(
        "--graph", metavar="FILE", type=_graph_path,
        help="also write the computational graph: FILE.dot (DOT text) or FILE.svg / .png / .pdf (needs "
             "graphviz's dot; without it the DOT text is written to FILE with suffix .dot)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the explanation; write the graph when asked.

    Returns:
      0 on success; 1, after one line on stderr, when the graph cannot be written or rendered.
      (A bad --graph suffix is a usage error: argparse exits with 2.)
    """
    model, loss, params, x, y = explain.example(
        seed=args.seed, batch=args.batch, activation=args.activation, sizes=args.sizes
    )
    result = explain.explain(model, loss, params, x, y, lr=args.lr)
    print(explain.format_explanation(result, precision=args.precision))
    if not args.graph:
        return 0
    try:
        path, _ = explain.write_graph(explain.to_dot(explain.computational_graph(result)), args.graph)
    except OSError as error:
        print(f"fbp explain: cannot write the graph to {args.graph}: {error.strerror or error}; "
              "pass --graph a path in a folder that exists and that you can write to", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines()
        print(f"fbp explain: graphviz's dot failed to render {args.graph}"
              f"{': ' + detail[0] if detail else f' (exit {error.returncode})'}; "
              f"write DOT text instead with --graph {Path(args.graph).with_suffix('.dot')}", file=sys.stderr)
        return 1
    if path == Path(args.graph):
        print(f"\ncomputational graph written to {path}")
    else:
        print(f"\ngraphviz's `dot` program was not found, so the graph is written as DOT text to {path}; "
              f"render it with: dot -T{Path(args.graph).suffix[1:]} {path} -o {args.graph}")
    return 0
