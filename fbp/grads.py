"""Gradients three ways: the hand-written backward, jax.grad, and both per example.

Everything here returns plain functions of ``(params, x, y)``; jit them as you
like (the train step does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.layers.base import call_apply, call_forward, call_per_example_backward, describe

MODES = ("manual", "autodiff", "custom_vjp")
PER_EXAMPLE = (False, True, "vmap")


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


def _check_per_example(per_example) -> None:
    if not (isinstance(per_example, bool) or isinstance(per_example, str) and per_example == "vmap"):
        raise ValueError(f"per_example must be one of {PER_EXAMPLE}, got {per_example!r}")


def _batch_forward_is_per_example(model, key) -> bool:
    """Whether one forward pass over the batch equals the vmapped single-example forwards.

    It does for fbp layers, which treat leading axes as independent examples,
    unless randomness is drawn: vmap gives example i the key fold_in(key, i).
    """
    return key is None or not getattr(model, "takes_key", False)


def _per_example_loss(loss, pred, y):
    """Each example's own loss and its gradient: values ``(batch,)``, dpred shaped like pred.

    The loss of example i alone is a batch of one, so dpred[i] is exactly the
    gradient of example i's loss with respect to its own prediction.
    """

    def one(pred_i, y_i):
        value, cache = loss.forward(pred_i, y_i)
        return value, loss.backward(cache)

    return jax.vmap(one)(pred, y)


def _averaged_per_example(model, loss, mode: str) -> Callable:
    """Mean of per-example gradients as one backward pass over the batch.

    Example i's gradient is backward(cache, e_i dpred_i), linear in dpred_i, and
    the examples do not mix; so the mean over i is backward(cache, dpred / B):
    each layer's backward sums the outer products over the batch in one matmul
    instead of materialising B of them.
    """

    def pullback(params, x, key):
        if mode == "manual":
            pred, cache = call_forward(model, params, x, key)
            return pred, lambda dpred: model.backward(params, cache, dpred)[0]
        apply = with_manual_vjp(model) if mode == "custom_vjp" else functools.partial(call_apply, model)
        pred, vjp = jax.vjp(lambda p: apply(p, x, key), params)
        return pred, lambda dpred: vjp(dpred)[0]

    def averaged(params, x, y, key=None):
        check_batch(model, x, y)
        pred, backward = pullback(params, x, key)
        values, dpred = _per_example_loss(loss, pred, y)
        return values.mean(), backward(dpred / values.shape[0])

    return averaged


def value_and_grad(model, loss, *, mode: str = "manual", per_example: bool | str = False) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)``, ``grads`` shaped like ``params``.

    Args:
      model: any layer (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      mode: ``"manual"`` (forward, loss forward/backward, then ``model.backward``),
        ``"autodiff"`` (jax.value_and_grad over ``model.apply``) or
        ``"custom_vjp"`` (jax.value_and_grad through ``with_manual_vjp``).
      per_example: ``False``: the batch gradient. ``True``: the mean of every
        example's own gradient (each example's loss and dpred computed alone,
        then one backward over the batch with dpred / batch, which sums the
        per-example gradients inside each layer; as fast as the batch step).
        ``"vmap"``: the same mean by jax.vmap over single examples, materialising
        every per-example gradient (also used for ``True`` when a model with
        dropout gets a key, since vmap gives example i the key fold_in(key, i)).
        All equal the batch gradient, since the batch loss is the mean of the
        per-example losses.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_per_example(per_example)
    if per_example is False:
        return _batch_value_and_grad(model, loss, mode)
    stacked = per_example_grads(model, loss, mode=mode)
    fast = _averaged_per_example(model, loss, mode)

    def averaged(params, x, y, key=None):
        if per_example is True and _batch_forward_is_per_example(model, key):
            return fast(params, x, y, key)
        values, grads = stacked(params, x, y, key)
        return values.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)

    return averaged


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
    """``min(1, C / ||g_i||)``: the factor that clips each example's gradient to norm C."""
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def clip_and_average(grads, clip_norm: float):
    """Clip each example's gradient to global L2 norm ``clip_norm``, then average.

    Args:
      grads: per-example gradients, every leaf (batch, ...).
      clip_norm: the bound C.

    Returns:
      (mean of g_i * min(1, C / ||g_i||), per-example norms (batch,)).
    """

    def sq_norms(g):  # (batch,), in at least float32
        g = g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32))
        return jnp.sum(g * g, axis=1)

    norms = jnp.sqrt(sum(sq_norms(g) for g in jax.tree_util.tree_leaves(grads)))
    factor = clip_factors(norms, clip_norm)
    mean = jax.tree_util.tree_map(lambda g: jnp.tensordot(factor.astype(g.dtype), g, axes=1) / g.shape[0], grads)
    return mean, norms


def clipped_value_and_grad(
    model, loss, clip_norm: float, *, mode: str = "manual", per_example: bool | str = True
) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, clipped mean gradient, norms)`` for DP-SGD.

    The gradient is ``mean_i g_i min(1, C / ||g_i||)`` with g_i example i's
    gradient and C = ``clip_norm``; ``norms: (batch,)`` holds every ||g_i||.

    With ``per_example=True`` and ``mode="manual"``, no g_i is materialised
    (ghost clipping, Li et al. 2021): one backward walk over the batch gets
    ||g_i||^2 from each layer's ``per_example_sq_norms`` (its cache and dy; for
    Dense, ||x_i|| ||dy_i||), the factors follow, and each layer's gradient
    with its dy scaled by factor_i / B is exactly the clipped mean (the dy's of
    the walk are reused, so there is no second walk: ``call_per_example_backward``).
    Otherwise (``"vmap"``, autodiff modes, dropout with a key, a model with
    neither ``per_example_backward`` nor ``per_example_sq_norms``) the g_i come
    from ``per_example_grads``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_per_example(per_example)
    if per_example is False:
        raise ValueError("clipping needs per-example gradients: pass per_example=True or 'vmap'")
    stacked = per_example_grads(model, loss, mode=mode)
    hooks = ("per_example_backward", "per_example_sq_norms")
    ghost = per_example is True and mode == "manual" and any(callable(getattr(model, h, None)) for h in hooks)

    def clipped(params, x, y, key=None):
        if not (ghost and _batch_forward_is_per_example(model, key)):
            values, grads = stacked(params, x, y, key)
            grads, norms = clip_and_average(grads, clip_norm)
            return values.mean(), grads, norms
        check_batch(model, x, y)
        pred, cache = call_forward(model, params, x, key)
        values, dpred = _per_example_loss(loss, pred, y)
        sq_norms, _, weighted_grads = call_per_example_backward(model, params, cache, dpred)
        norms = jnp.sqrt(sq_norms)
        return values.mean(), weighted_grads(clip_factors(norms, clip_norm) / values.shape[0]), norms

    return clipped
