"""An ``Explanation`` as readable text: the side-by-side table, then every value, forward, backward, update."""

from __future__ import annotations

import jax
import numpy as np

from fbp.explain.explanation import Explanation
from fbp.layers import describe


def format_shape(value) -> str:
    """``(2, 4)``: the shape of an array (or of anything numpy can shape) as printed."""
    return str(tuple(np.shape(value)))


def _matrix(value, precision: int, indent: str = "      ") -> list[str]:
    """Rows of numbers, one line per row (a vector is one row, a scalar one number)."""
    array = np.asarray(value)
    if array.dtype == bool:
        array = array.astype(int)
    rows = np.atleast_2d(array)
    width = precision + 4
    return [indent + " ".join(f"{v:{width}.{precision}f}" for v in row) for row in rows]


def _cache_bytes(cache) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(cache))


def _cache_summary(cache) -> str:
    leaves = jax.tree_util.tree_leaves(cache)
    parts = [f"{format_shape(leaf)} {np.asarray(leaf).dtype}" for leaf in leaves]
    return f"{' + '.join(parts)}, {_cache_bytes(cache)} bytes"


def _block(title: str, value, precision: int, width: int = 44) -> list[str]:
    return [f"  {title:<{width}} shape {format_shape(value)}", *_matrix(value, precision)]


def _side_by_side(e: Explanation) -> list[str]:
    """One row per computed value: each layer's forward formula next to its backward formulas, with shapes."""
    rows = [("layer", "forward", "shape", "backward", "shape")]
    backward = {step.index: step for step in e.backward}
    for step in e.forward:
        back = backward[step.index]
        for j, (formula, value) in enumerate(zip(back.formulas, back.values)):
            first = j == 0
            rows.append((step.layer if first else "", step.formula if first else "",
                         format_shape(step.y) if first else "", formula, format_shape(value)))
    name = type(e.loss).__name__
    rows.append((name, e.loss_formula, "()", e.loss_backward_formula, format_shape(e.dprediction)))
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
        total_cache += _cache_bytes(step.cache)
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
