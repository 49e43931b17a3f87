"""Gradients three ways: the hand-written backward, jax.grad, and both per example.

Everything here returns plain functions of ``(params, x, y)``; jit them as you
like (the train step does).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fbp.layers.base import call_apply, call_forward, describe

MODES = ("manual", "autodiff", "custom_vjp")


def with_manual_vjp(model) -> Callable:
    """``f(params, x, key=None) = model.apply(params, x)`` whose VJP is ``model.backward``.

    The forward runs ``model.forward`` and keeps its cache as the residual, so
    ``jax.grad``, optax and any JAX transformation use the hand-written gradients.
    A discrete input (Embedding ids) gets a zero cotangent.
    """

    @jax.custom_vjp
    def f(params, x, key):
        return call_apply(model, params, x, key)

    def fwd(params, x, key):
        y, cache = call_forward(model, params, x, key)
        return y, (params, cache)

    def bwd(residuals, dy):
        params, cache = residuals
        dparams, dx = model.backward(params, cache, dy)
        return dparams, dx, None

    f.defvjp(fwd, bwd)

    def apply(params, x, key=None):
        return f(params, x, key)

    return apply


def check_batch(model, x, y) -> None:
    """Raise ValueError unless x and y have a leading batch axis of the same size."""
    x_shape, y_shape = jnp.shape(x), jnp.shape(y)
    if len(x_shape) < 1 or len(y_shape) < 1:
        raise ValueError(
            f"{describe(model)}: expected batched x and y (a leading batch axis), got shapes {x_shape} and {y_shape}"
        )
    if x_shape[0] != y_shape[0]:
        raise ValueError(
            f"{describe(model)}: x and y must have the same batch size, got x {x_shape} "
            f"(batch {x_shape[0]}) and y {y_shape} (batch {y_shape[0]})"
        )
    if x_shape[0] == 0:
        raise ValueError(f"{describe(model)}: the batch is empty (x has shape {x_shape})")


def _batch_value_and_grad(model, loss, mode: str) -> Callable:
    if mode == "manual":

        def manual(params, x, y, key=None):
            pred, cache = call_forward(model, params, x, key)  # forward pass, keeping the cache
            value, loss_cache = loss.forward(pred, y)
            dpred = loss.backward(loss_cache)  # dL/dpred
            dparams, _ = model.backward(params, cache, dpred)  # the chain rule, layer by layer
            return value, dparams

        return manual
    if mode == "autodiff":

        def autodiff(params, x, y, key=None):
            return jax.value_and_grad(lambda p: loss(call_apply(model, p, x, key), y))(params)

        return autodiff
    if mode == "custom_vjp":
        apply = with_manual_vjp(model)

        def custom(params, x, y, key=None):
            return jax.value_and_grad(lambda p: loss(apply(p, x, key), y))(params)

        return custom
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def per_example_grads(model, loss, *, mode: str = "manual") -> Callable:
    """``f(params, x, y, key=None) -> (values, grads)`` for every example separately.

    Each leaf of ``grads`` gains a leading batch axis: ``grads[leaf][i]`` is the
    gradient of example i's loss (jax.vmap over single examples, which every
    layer accepts without a batch axis). ``values: (batch,)``. With a key,
    example i gets ``jax.random.fold_in(key, i)``.
    """
    single = _batch_value_and_grad(model, loss, mode)

    def f(params, x, y, key=None):
        check_batch(model, x, y)
        if key is None:
            return jax.vmap(single, in_axes=(None, 0, 0))(params, x, y)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(jnp.shape(x)[0]))
        return jax.vmap(single, in_axes=(None, 0, 0, 0))(params, x, y, keys)

    return f


def value_and_grad(model, loss, *, mode: str = "manual", per_example: bool = False) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)``, ``grads`` shaped like ``params``.

    Args:
      model: any layer (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      mode: ``"manual"`` (forward, loss forward/backward, then ``model.backward``),
        ``"autodiff"`` (jax.value_and_grad over ``model.apply``) or
        ``"custom_vjp"`` (jax.value_and_grad through ``with_manual_vjp``).
      per_example: compute every example's gradient with jax.vmap over single
        examples and average them; equal to the batch gradient, since the batch
        loss is the mean of the per-example losses.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not per_example:
        return _batch_value_and_grad(model, loss, mode)
    stacked = per_example_grads(model, loss, mode=mode)

    def averaged(params, x, y, key=None):
        values, grads = stacked(params, x, y, key)
        return values.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)

    return averaged


