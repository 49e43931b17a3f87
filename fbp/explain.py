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
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers.activations import GELU, LeakyReLU, ReLU, Sigmoid, Tanh
from fbp.layers.base import describe
from fbp.layers.combinators import Sequential
from fbp.layers.dense import Dense
from fbp.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "leaky_relu": LeakyReLU, "gelu": GELU}

# (forward, backward) formulas of each activation, with {z}, {a}, {dz}, {da} for the value names.
_ACTIVATION_FORMULAS = {
    ReLU: ("{a} = max({z}, 0)", "{dz} = {da} * ({z} > 0)"),
    LeakyReLU: ("{a} = {z} if {z} > 0 else slope * {z}", "{dz} = {da} * (1 if {z} > 0 else slope)"),
    Tanh: ("{a} = tanh({z})", "{dz} = {da} * (1 - {a}^2)"),
    Sigmoid: ("{a} = sigmoid({z})", "{dz} = {da} * {a} * (1 - {a})"),
    GELU: ("{a} = gelu({z})", "{dz} = {da} * gelu'({z})"),
}

# What each layer's cache holds and why that is enough for its backward pass ({x}: input, {y}: output).
_CACHE_REASONS = {
    Dense: "{x}, the input: d{W} = {x}^T @ d{y}",
    ReLU: "the mask {x} > 0: d{x} = d{y} where {x} > 0, else 0",
    LeakyReLU: "the mask {x} > 0, which picks the slope",
    Tanh: "{y}, the output: tanh' = 1 - {y}^2",
    Sigmoid: "{y}, the output: sigmoid' = {y} (1 - {y})",
    GELU: "{x} and tanh(u), the two factors of gelu'",
}

# (forward, backward) formulas of each loss, with {p} for the prediction's name and {n} for the divisor.
_LOSS_FORMULAS = {
    MSE: ("L = mean(({p} - Y)^2)", "d{p} = 2 ({p} - Y) / {n}"),
    SoftmaxCrossEntropy: ("L = mean(-sum(Y * log softmax({p})))", "d{p} = (softmax({p}) - Y) / {n}"),
    BinaryCrossEntropy: ("L = mean(BCE(sigmoid({p}), Y))", "d{p} = (sigmoid({p}) - Y) / {n}"),
}


@dataclasses.dataclass(frozen=True)
class ForwardStep:
    """One layer's forward pass.

    Attributes:
      index: the layer's position in ``model.layers`` (0-based).
      layer: its short name, e.g. ``Dense(4)``.
      input_name, output_name: textbook names, e.g. ``A[0]`` -> ``Z[1]``.
      formula: what the layer computes, in those names.
      x: the input, (batch, in). y: the output, (batch, out).
      cache: what the layer's ``forward`` kept for its ``backward``.
      cache_reason: what the cache holds, and why that is enough.
    """

    index: int
    layer: str
    input_name: str
    output_name: str
    formula: str
    x: jax.Array
    y: jax.Array
    cache: Any
    cache_reason: str


@dataclasses.dataclass(frozen=True)
class BackwardStep:
    """One layer's backward pass.

    Attributes:
      index: the layer's position in ``model.layers``.
      layer: its short name.
      dy_name, dx_name: e.g. ``dZ[2]`` (what arrives) and ``dA[1]`` (what leaves).
      dy: dL/d(output), (batch, out). dx: dL/d(input), (batch, in).
      dparams: ``{"W": dW, "b": db}`` for a Dense layer, ``{}`` otherwise.
      formulas: one line per computed value, e.g. ``dW[2] = A[1]^T @ dZ[2]``.
      names: the textbook name of each value in ``formulas``, in the same order.
      values: those values, in the same order.
    """

    index: int
    layer: str
    dy_name: str
    dx_name: str
    dy: jax.Array
    dx: jax.Array
    dparams: dict
    formulas: tuple[str, ...]
    names: tuple[str, ...]
    values: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Everything one step of gradient descent computes, as returned by ``explain``.

    Attributes:
      model, loss: the layer and the loss.
      x: (batch, in) inputs. target: the targets.
      params: the parameters before the step (a list, one entry per layer).
      param_names: per layer, ``{"W": "W[1]", "b": "b[1]"}`` or ``{}``.
      forward: the ForwardSteps, input to output.
      prediction: the model's output, (batch, out).
      loss_value: L on this batch.
      loss_formula, loss_backward_formula: L and dL/d(prediction), in names.
      dprediction: dL/d(prediction), what the loss's ``backward`` returned.
      backward: the BackwardSteps, output to input (reverse layer order).
      grads: dL/dparams, shaped like ``params`` (what ``fbp.value_and_grad`` returns).
      lr: the learning rate.
      new_params: ``params - lr * grads``, leaf by leaf.
      new_loss_value: L on the same batch with ``new_params``.
      autodiff_max_abs_diff: the largest |grads - jax.grad| over every parameter.
    """

    model: Any
    loss: Any
    x: jax.Array
    target: jax.Array
    params: list
    param_names: list
    forward: tuple[ForwardStep, ...]
    prediction: jax.Array
    loss_value: float
    loss_formula: str
    loss_backward_formula: str
    dprediction: jax.Array
    backward: tuple[BackwardStep, ...]
    grads: list
    lr: float
    new_params: list
    new_loss_value: float
    autodiff_max_abs_diff: float

    @property
    def prediction_name(self) -> str:
        return self.forward[-1].output_name


def tiny_mlp(sizes: tuple[int, ...] = (3, 4, 2), activation: str = "tanh") -> Sequential:
    """``Dense(sizes[1]) -> g -> ... -> Dense(sizes[-1])``: an activation after every Dense but the last.

    Args:
      sizes: input width, hidden widths, output width (at least two entries).
      activation: a key of ``ACTIVATIONS``.
    """
    if len(sizes) < 2:
        raise ValueError(f"tiny_mlp: sizes needs an input and an output width, got {sizes!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"tiny_mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers = []
    for width in sizes[1:-1]:
        layers += [Dense(width), ACTIVATIONS[activation]()]
    return Sequential([*layers, Dense(sizes[-1])])


def example(*, seed: int = 0, batch: int = 2, activation: str = "tanh", sizes: tuple[int, ...] = (3, 4, 2),
            dtype=jnp.float32):
    """A tiny regression problem: ``(model, MSE(), params, x, y)``.

    ``x: (batch, sizes[0])`` and ``y: (batch, sizes[-1])`` are standard normal;
    the biases start at 0.1 rather than 0 so that db and b are visible in print.
    """
    if batch < 1:
        raise ValueError(f"example: batch must be >= 1, got {batch}")
    model = tiny_mlp(sizes, activation)
    key_params, key_x, key_y = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(key_x, (batch, sizes[0]), dtype)
    y = jax.random.normal(key_y, (batch, sizes[-1]), dtype)
    params = model.init(key_params, x)
    params = [dict(p, b=jnp.full_like(p["b"], 0.1)) if "b" in p else p for p in params]
    return model, MSE(), params, x, y


def _check_model(model) -> None:
    if not isinstance(model, Sequential):
        raise TypeError(f"explain: expected a Sequential of Dense layers and activations, got {describe(model)}")
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, (Dense, *_ACTIVATION_FORMULAS)):
            raise TypeError(
                f"explain: layer [{i}] is {describe(layer)}; explain handles Dense and the activations "
                f"{', '.join(cls.__name__ for cls in _ACTIVATION_FORMULAS)}"
            )


def _names(model) -> list[tuple[str, str, dict]]:
    """Per layer: (input name, output name, param names), textbook style."""
    names, current, depth = [], "A[0]", 0
    for layer in model.layers:
        if isinstance(layer, Dense):
            depth += 1
            out = f"Z[{depth}]"
            params = {"W": f"W[{depth}]", "b": f"b[{depth}]"} if layer.use_bias else {"W": f"W[{depth}]"}
        else:
            out = f"A[{depth}]" if current.startswith("Z") else current + "'"
            params = {}
        names.append((current, out, params))
        current = out
    return names


def _forward_formula(layer, x_name: str, y_name: str, params: dict) -> str:
    if isinstance(layer, Dense):
        bias = f" + {params['b']}" if "b" in params else ""
        return f"{y_name} = {x_name} @ {params['W']}{bias}"
    return _ACTIVATION_FORMULAS[type(layer)][0].format(z=x_name, a=y_name)


def _backward_lines(layer, x_name, y_name, params, dparams, dx):
    """(formulas, names, values) of what one layer's backward produced."""
    dy_name, dx_name = "d" + y_name, "d" + x_name
    if isinstance(layer, Dense):
        lines = [(f"d{params['W']} = {x_name}^T @ {dy_name}", "d" + params["W"], dparams["W"])]
        if "b" in params:
            lines.append((f"d{params['b']} = sum over the batch of {dy_name}", "d" + params["b"], dparams["b"]))
        lines.append((f"{dx_name} = {dy_name} @ {params['W']}^T", dx_name, dx))
    else:
        formula = _ACTIVATION_FORMULAS[type(layer)][1].format(z=x_name, a=y_name, dz=dx_name, da=dy_name)
        lines = [(formula, dx_name, dx)]
    formulas, names, values = zip(*lines)
    return formulas, names, values


def _loss_formulas(loss, pred_name: str, pred) -> tuple[str, str]:
    forward, backward = _LOSS_FORMULAS.get(type(loss), ("L = loss({p}, Y)", "d{p} = dL/d{p}"))
    n = pred.shape[0] if isinstance(loss, SoftmaxCrossEntropy) else pred.size
    return forward.format(p=pred_name), backward.format(p=pred_name, n=n)


def explain(model, loss, params, x, y, *, lr: float = 0.1) -> Explanation:
    """Run one step of gradient descent one layer at a time and keep every value.

    Args:
      model: a ``Sequential`` of ``Dense`` layers and elementwise activations.
      loss: a loss from ``fbp.losses`` (MSE for regression).
      params: the model's params (a list, one entry per layer).
      x: ``(batch, in)`` inputs. y: the targets the loss expects.
      lr: the learning rate of the update ``W_new = W - lr * dW``.

    Returns:
      An ``Explanation``. Its ``grads`` equal ``fbp.value_and_grad(model, loss)``'s.
    """
    _check_model(model)
    if not isinstance(params, (list, tuple)) or len(params) != len(model.layers):
        raise ValueError(f"explain: expected params as a list of {len(model.layers)}, one entry per layer")
    names = _names(model)
    forward, caches, a = [], [], x
    for i, (layer, p, (x_name, y_name, p_names)) in enumerate(zip(model.layers, params, names)):
        out, cache = layer.forward(p, a)  # the layer's own forward, as Sequential.forward calls it
        formula = _forward_formula(layer, x_name, y_name, p_names)
        reason = _CACHE_REASONS[type(layer)].format(x=x_name, y=y_name, W=p_names.get("W"))
        forward.append(ForwardStep(i, describe(layer), x_name, y_name, formula, a, out, cache, reason))
        caches.append(cache)
        a = out
    value, loss_cache = loss.forward(a, y)
    dy = loss.backward(loss_cache)  # dL/d(prediction)
    loss_formula, loss_backward_formula = _loss_formulas(loss, names[-1][1], a)

    backward, grads, dpred = [], [None] * len(model.layers), dy
    for i in reversed(range(len(model.layers))):  # the chain rule, as Sequential.backward walks it
        layer, (x_name, y_name, p_names) = model.layers[i], names[i]
        grads[i], dx = layer.backward(params[i], caches[i], dy)
        formulas, value_names, values = _backward_lines(layer, x_name, y_name, p_names, grads[i], dx)
        backward.append(BackwardStep(i, describe(layer), "d" + y_name, "d" + x_name, dy, dx, grads[i],
                                     formulas, value_names, values))
        dy = dx

    new_params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    new_value = loss(model.apply(new_params, x), y)
    autodiff = jax.grad(lambda p: loss(model.apply(p, x), y))(params)
    diffs = jax.tree_util.tree_map(lambda g, r: float(jnp.max(jnp.abs(g - r))), grads, autodiff)
    return Explanation(model, loss, x, y, params, [n[2] for n in names], tuple(forward), a, float(value),
                       loss_formula, loss_backward_formula, dpred, tuple(backward), grads, float(lr),
                       new_params, float(new_value), max(jax.tree_util.tree_leaves(diffs), default=0.0))


# ---------------------------------------------------------------------------------------------- text


def _matrix(value, precision: int, indent: str = "      ") -> list[str]:
    """Rows of numbers, one line per row (a vector is one row, a scalar one number)."""
    array = np.asarray(value)
    if array.dtype == bool:
        array = array.astype(int)
    rows = np.atleast_2d(array)
    width = precision + 4
    return [indent + " ".join(f"{v:{width}.{precision}f}" for v in row) for row in rows]


def _shape(value) -> str:
    return str(tuple(np.shape(value)))


def _cache_summary(cache) -> str:
    leaves = jax.tree_util.tree_leaves(cache)
    parts = [f"{_shape(leaf)} {np.asarray(leaf).dtype}" for leaf in leaves]
    return f"{' + '.join(parts)}, {sum(np.asarray(leaf).nbytes for leaf in leaves)} bytes"


def _block(title: str, value, precision: int, width: int = 44) -> list[str]:
    return [f"  {title:<{width}} shape {_shape(value)}", *_matrix(value, precision)]


def _side_by_side(e: Explanation) -> list[str]:
    """One row per computed value: each layer's forward formula next to its backward formulas, with shapes."""
    rows = [("layer", "forward", "shape", "backward", "shape")]
    backward = {step.index: step for step in e.backward}
    for step in e.forward:
        back = backward[step.index]
        for j, (formula, value) in enumerate(zip(back.formulas, back.values)):
            first = j == 0
            rows.append((step.layer if first else "", step.formula if first else "", _shape(step.y) if first else "",
                         formula, _shape(value)))
    name = type(e.loss).__name__
    rows.append((name, e.loss_formula, "()", e.loss_backward_formula, _shape(e.dprediction)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_explanation(e: Explanation, precision: int = 4) -> str:
    """The explanation as readable text: parameters, forward pass, backward pass, update."""
    batch = np.shape(e.x)[0]
    arrows = " -> ".join(describe(layer) for layer in e.model.layers)
    lines = [
        f"fbp explain: {arrows}, loss {type(e.loss).__name__}, batch of {batch}, lr {e.lr:g}",
        "Batch-first: row i of X, Z, A (and of dZ, dA) belongs to example i; Z = A_prev @ W + b.",
        "Column-per-example textbooks write the transposes: Z^T = W^T A_prev^T + b, dW^T = dZ^T A_prev.",
        "",
        "== Side by side: what each layer computes forward (top to bottom) and backward (bottom to top) ==",
        *_side_by_side(e),
        "",
        "== Parameters ==",
    ]
    for p, names in zip(e.params, e.param_names):
        for key, name in names.items():
            lines += _block(name, p[key], precision)
    lines += ["", "== Input and target =="]
    lines += _block("X = A[0]", e.x, precision) + _block("Y (target)", e.target, precision)
    lines += ["", "== Forward pass: input -> loss, layer by layer (the cache is kept for the backward pass) =="]
    total_cache = 0
    for step in e.forward:
        lines.append(f"[{step.index + 1}] {step.layer}")
        lines += _block(step.formula, step.y, precision)
        lines.append(f"      cache: {step.cache_reason}   [{_cache_summary(step.cache)}]")
        total_cache += sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(step.cache))
    lines.append(f"[loss] {type(e.loss).__name__}")
    lines.append(f"  {e.loss_formula} = {e.loss_value:.{precision + 2}f}")
    lines.append(f"  (all caches together: {total_cache} bytes; they grow with the batch, the params do not)")
    lines += ["", "== Backward pass: loss -> input, layers in reverse (the chain rule) =="]
    lines.append(f"[loss] {type(e.loss).__name__}")
    lines += _block(e.loss_backward_formula, e.dprediction, precision)
    for step in e.backward:
        lines.append(f"[{step.index + 1}] {step.layer}")
        for formula, value in zip(step.formulas, step.values):
            lines += _block(formula, value, precision)
        if step.dx_name == "dA[0]":
            lines.append("      (dA[0] = dX, the gradient for the input: no update needs it; a layer below X would)")
    lines.append(f"check: every dW and db above equals jax.grad of the same loss "
                 f"(largest difference {e.autodiff_max_abs_diff:.1e})")
    lines += ["", f"== Update: plain gradient descent, W_new = W - lr * dW with lr = {e.lr:g} =="]
    for p, new_p, names in zip(e.params, e.new_params, e.param_names):
        for key, name in names.items():
            lines += _block(f"{name} - {e.lr:g} * d{name}", new_p[key], precision)
    change = "down" if e.new_loss_value < e.loss_value else "UP (lr too large?)"
    summary = (f"loss on this batch: {e.loss_value:.{precision + 2}f} before the step, "
               f"{e.new_loss_value:.{precision + 2}f} after ({change})")
    lines += ["", summary]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- graph


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
            edges.append(Edge(pid, op, f"{name} {_shape(p[key])}", "forward"))
            edges.append(Edge(op, pid, f"d{name}", "backward"))
        edges.append(Edge(previous, op, f"{step.input_name} {_shape(step.x)}", "forward"))
        edges.append(Edge(op, previous, f"d{step.input_name}", "backward"))
        previous = op
    nodes += [Node("loss", f"{type(e.loss).__name__}\n{e.loss_formula}", "op"), Node("L", "L", "output")]
    edges += [
        Edge(previous, "loss", f"{e.prediction_name} {_shape(e.prediction)}", "forward"),
        Edge("loss", previous, f"d{e.prediction_name}", "backward"),
        Edge("Y", "loss", f"Y {_shape(e.target)}", "forward"),
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
    """Write ``dot`` to ``path``: as DOT for ``.dot``, else rendered by graphviz's ``dot`` binary.

    Args:
      dot: DOT text from ``to_dot``.
      path: ``*.dot``, ``*.svg``, ``*.png`` or ``*.pdf``.

    Returns:
      (the file written, whether it was rendered). Without graphviz installed,
      a ``.svg``/``.png`` request writes the DOT text next to it, with the
      suffix ``.dot``, and returns False.
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
    subprocess.run([binary, f"-T{suffix}", "-o", str(path)], input=dot, text=True, check=True)
    return path, True


# -------------------------------------------------------------------------------- finite differences


@functools.partial(jax.jit, static_argnums=(0, 2))
def _shifted_loss(f: Callable, params, leaf: int, index, step):
    """One forward pass: ``f(params)`` with element ``index`` of leaf number ``leaf`` moved by ``step``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves[leaf] = leaves[leaf].reshape(-1).at[index].add(step).reshape(leaves[leaf].shape)
    return f(treedef.unflatten(leaves))


def finite_difference_gradient(f: Callable, params, *, eps: float | None = None):
    """The gradient of a scalar ``f(params)`` by central differences, one parameter at a time.

    dL/dtheta_i ~ (f(theta + eps e_i) - f(theta - eps e_i)) / (2 eps): two
    forward passes for every parameter, the cost that backprop avoids. Each
    pass is one call of a jitted function; ``f`` must be hashable (a function
    is), and calling again with the same ``f`` reuses the compiled code.

    Args:
      f: params -> scalar loss.
      params: any pytree of float arrays.
      eps: the step; defaults to 1e-6 in float64 and 1e-3 in lower precision.

    Returns:
      (grads shaped like ``params``, the number of forward passes made: 2 x the number of parameters).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    grads, forward_passes = [], 0
    for j, leaf in enumerate(leaves):
        step = eps if eps is not None else (1e-6 if leaf.dtype == jnp.float64 else 1e-3)
        plus, minus = [], []
        for k in range(leaf.size):
            plus.append(_shifted_loss(f, params, j, k, step))
            minus.append(_shifted_loss(f, params, j, k, -step))
            forward_passes += 2
        difference = np.asarray(jax.device_get(plus), np.float64) - np.asarray(jax.device_get(minus), np.float64)
        grads.append(jnp.asarray((difference / (2 * step)).reshape(leaf.shape), leaf.dtype))
    return treedef.unflatten(grads), forward_passes
