"""One step of gradient descent run one layer at a time, every value kept: ``explain`` and its records.

``explain`` calls each layer's own ``forward`` and ``backward`` (the same calls,
in the same order, as ``Sequential.forward``/``backward``), so what it returns
IS what fbp computes. ``tiny_mlp`` and ``example`` make the small problems it is
shown on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fbp.explain.formulas import (
    ACTIVATIONS,
    backward_lines,
    cache_reason,
    check_model,
    forward_formula,
    loss_formulas,
    textbook_names,
)
from fbp.layers import Dense, Sequential, describe
from fbp.losses import MSE


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
    check_model(model)
    if not isinstance(params, (list, tuple)) or len(params) != len(model.layers):
        raise ValueError(f"explain: expected params as a list of {len(model.layers)}, one entry per layer")
    names = textbook_names(model)
    forward, caches, a = [], [], x
    for i, (layer, p, (x_name, y_name, p_names)) in enumerate(zip(model.layers, params, names)):
        out, cache = layer.forward(p, a)  # the layer's own forward, as Sequential.forward calls it
        formula = forward_formula(layer, x_name, y_name, p_names)
        reason = cache_reason(layer, x_name, y_name, p_names)
        forward.append(ForwardStep(i, describe(layer), x_name, y_name, formula, a, out, cache, reason))
        caches.append(cache)
        a = out
    value, loss_cache = loss.forward(a, y)
    dy = loss.backward(loss_cache)  # dL/d(prediction)
    loss_formula, loss_backward_formula = loss_formulas(loss, names[-1][1], a)

    backward, grads, dpred = [], [None] * len(model.layers), dy
    for i in reversed(range(len(model.layers))):  # the chain rule, as Sequential.backward walks it
        layer, (x_name, y_name, p_names) = model.layers[i], names[i]
        grads[i], dx = layer.backward(params[i], caches[i], dy)
        formulas, value_names, values = backward_lines(layer, x_name, y_name, p_names, grads[i], dx)
        backward.append(BackwardStep(i, describe(layer), "d" + y_name, "d" + x_name, dy, dx, grads[i],
                                     formulas, value_names, values))
        dy = dx

    new_params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    new_value = loss(model.apply(new_params, x), y)
    autodiff = jax.grad(lambda p: loss(model.apply(p, x), y))(params)  # the reference, outside any layer
    diffs = jax.tree_util.tree_map(lambda g, r: float(jnp.max(jnp.abs(g - r))), grads, autodiff)
    return Explanation(model, loss, x, y, params, [n[2] for n in names], tuple(forward), a, float(value),
                       loss_formula, loss_backward_formula, dpred, tuple(backward), grads, float(lr),
                       new_params, float(new_value), max(jax.tree_util.tree_leaves(diffs), default=0.0))
