"""Backprop, printed: every value of a tiny network's forward pass, backward pass and update.

``explain`` runs a ``Sequential`` of ``Dense`` layers and activations one layer
at a time with each layer's own ``forward`` and ``backward`` (the same calls,
in the same order, as ``Sequential.forward``/``backward``), and keeps every
intermediate value, so what is printed IS what fbp computes::

    model, loss, params, x, y = fbp.explain.example(seed=0, batch=2)
    e = fbp.explain.explain(model, loss, params, x, y, lr=0.1)
    print(fbp.explain.format_explanation(e))
    dot = fbp.explain.to_dot(fbp.explain.computational_graph(e))
    grads, forward_passes = fbp.explain.finite_difference_gradient(f, params)  # the slow way

Names follow the textbook: layer l computes ``Z[l] = A[l-1] @ W[l] + b[l]``
and ``A[l] = g(Z[l])``, with ``A[0] = X``; ``dZ[l]`` is dL/dZ[l] (the error
signal delta). Batch-first: row i of every matrix is example i.

The rooms: ``formulas`` (textbook names and each layer's math), ``explanation``
(``explain``, its records, the tiny examples), ``text`` (``format_explanation``),
``graph`` (the computational graph, DOT, graphviz), ``finite_diff`` (the slow
reference gradient). This file only re-exports.
"""

from fbp.explain.explanation import BackwardStep, Explanation, ForwardStep, example, explain, tiny_mlp
from fbp.explain.finite_diff import finite_difference_gradient
from fbp.explain.formulas import ACTIVATIONS
from fbp.explain.graph import GRAPH_SUFFIXES, Edge, Graph, Node, computational_graph, to_dot, write_graph
from fbp.explain.text import format_explanation

__all__ = [
    "ACTIVATIONS",
    "GRAPH_SUFFIXES",
    "BackwardStep",
    "Edge",
    "Explanation",
    "ForwardStep",
    "Graph",
    "Node",
    "computational_graph",
    "example",
    "explain",
    "finite_difference_gradient",
    "format_explanation",
    "tiny_mlp",
    "to_dot",
    "write_graph",
]
