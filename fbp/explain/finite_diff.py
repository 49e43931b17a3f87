"""The slow way to a gradient: central differences, two forward passes per parameter.

What backprop saves is the subject of ``scripts/why_backprop.py`` and of
docs/concepts.md; this is the reference it is measured against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


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
