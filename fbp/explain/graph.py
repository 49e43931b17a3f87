"""The computational graph of an ``Explanation``, as nodes and edges, as DOT text, and as a file.

Forward edges carry values (solid blue in DOT), backward edges carry gradients
(dashed red); ``write_graph`` renders with graphviz's ``dot`` where installed.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from fbp.explain.explanation import Explanation
from fbp.explain.text import format_shape


@dataclasses.dataclass(frozen=True)
class Node:
    """A graph node. ``kind``: "input" (X, Y), "param" (W, b), "op" (a layer or the loss), "output" (L)."""

    id: str
    label: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Edge:
    """A value flowing forward (``direction="forward"``) or a gradient flowing back (``"backward"``)."""

    source: str
    target: str
    label: str
    direction: str


@dataclasses.dataclass(frozen=True)
class Graph:
    """The computational graph of one forward and backward pass."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]


def computational_graph(e: Explanation) -> Graph:
    """Nodes: inputs, parameters, one operation per layer, the loss. Edges: values forward, gradients back.

    Every forward edge ``a -> b`` labelled ``v`` has a backward edge ``b -> a``
    labelled ``dv`` (dL/dv), except the target Y, which gets no gradient.
    """
    nodes = [Node("X", "X = A[0]", "input"), Node("Y", "Y (target)", "input")]
    edges = []
    previous = "X"
    for step, names, p in zip(e.forward, e.param_names, e.params):
        op = f"op{step.index + 1}"
        nodes.append(Node(op, f"{step.layer}\n{step.formula}", "op"))
        for key, name in names.items():
            pid = name.replace("[", "").replace("]", "")
            nodes.append(Node(pid, name, "param"))
            edges.append(Edge(pid, op, f"{name} {format_shape(p[key])}", "forward"))
            edges.append(Edge(op, pid, f"d{name}", "backward"))
        edges.append(Edge(previous, op, f"{step.input_name} {format_shape(step.x)}", "forward"))
        edges.append(Edge(op, previous, f"d{step.input_name}", "backward"))
        previous = op
    nodes += [Node("loss", f"{type(e.loss).__name__}\n{e.loss_formula}", "op"), Node("L", "L", "output")]
    edges += [
        Edge(previous, "loss", f"{e.prediction_name} {format_shape(e.prediction)}", "forward"),
        Edge("loss", previous, f"d{e.prediction_name}", "backward"),
        Edge("Y", "loss", f"Y {format_shape(e.target)}", "forward"),
        Edge("loss", "L", f"L = {e.loss_value:.4g}", "forward"),
        Edge("L", "loss", "dL/dL = 1", "backward"),
    ]
    return Graph(tuple(nodes), tuple(edges))


_NODE_STYLE = {
    "input": 'shape=ellipse, style=filled, fillcolor="#dbe9f6"',
    "param": 'shape=ellipse, style=filled, fillcolor="#fde9c9"',
    "op": 'shape=box, style="rounded,filled", fillcolor="#eeeeee"',
    "output": 'shape=doublecircle, style=filled, fillcolor="#d5f0d5"',
}
_EDGE_STYLE = {
    "forward": 'color="#1f4e79"',
    "backward": 'color="#c0392b", fontcolor="#c0392b", style=dashed, constraint=false',
}


def _quote(text: str) -> str:
    """A DOT string: quotes and backslashes escaped, newlines as DOT's \\n."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    """The graph in the DOT language of graphviz: forward edges solid blue, backward edges dashed red."""
    lines = ["digraph backprop {", "  rankdir=LR;", '  node [fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    lines += [f"  {node.id} [label={_quote(node.label)}, {_NODE_STYLE[node.kind]}];" for node in graph.nodes]
    lines += [f"  {edge.source} -> {edge.target} [label={_quote(edge.label)}, {_EDGE_STYLE[edge.direction]}];"
              for edge in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


GRAPH_SUFFIXES = (".dot", ".gv", ".svg", ".png", ".pdf")


def write_graph(dot: str, path: str | Path) -> tuple[Path, bool]:
    """Write ``dot`` to ``path``: as DOT for ``.dot``/``.gv``, else rendered by graphviz's ``dot`` binary.

    Args:
      dot: DOT text from ``to_dot``.
      path: ``*.dot``, ``*.gv``, ``*.svg``, ``*.png`` or ``*.pdf``.

    Returns:
      (the file written, whether it was rendered). Without graphviz installed,
      a ``.svg``/``.png``/``.pdf`` request writes the DOT text next to it, with
      the suffix ``.dot``, and returns False.

    Raises:
      ValueError: ``path`` has another suffix.
      OSError: the file cannot be written.
      subprocess.CalledProcessError: graphviz failed to render.
    """
    path = Path(path)
    if path.suffix.lower() not in GRAPH_SUFFIXES:
        raise ValueError(f"write_graph: expected a path ending in {', '.join(GRAPH_SUFFIXES)}, got {str(path)!r}")
    suffix = path.suffix.lower()[1:]
    if suffix in ("dot", "gv"):
        path.write_text(dot)
        return path, False
    binary = shutil.which("dot")
    if binary is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(dot)
        return dot_path, False
    subprocess.run([binary, f"-T{suffix}", "-o", str(path)], input=dot, text=True, check=True, capture_output=True)
    return path, True
