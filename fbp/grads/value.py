"""Loss value and gradient: over the batch, per example (stacked), and the per-example mean in one backward."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.grads.pieces import (
    batch_forward_is_per_example,
    batch_value_and_grad,
    make_pullback,
    mask_examples,
    masked_mean_weights,
    per_example_loss,
)
from fbp.grads.validate import (
    check_batch,
    check_is_layer,
    check_is_loss,
    check_mask,
    check_params,
    check_per_example,
    resolve_grad_mode,
)
from fbp.layers.base import scale_examples


def per_example_value_and_grad(model, loss, *, grad: str = "manual", mode: str | None = None) -> Callable:
    """``f(params, x, y, key=None) -> (values, grads)``: every example's loss and gradient, separately.

    By jax.vmap over single examples (every layer accepts an example without a
    batch axis), each computed as ``grad`` says. With a key, example i gets
    ``jax.random.fold_in(key, i)``.

    Args:
      model: any layer. loss: a loss from ``fbp.losses``.
      grad: one of ``GRAD_MODES`` (see the module docstring).
      mode: deprecated spelling of ``grad``.

    Returns:
      ``values: (batch,)``, each example's loss; ``grads`` shaped like params
      with a leading batch axis on every leaf: ``grads[leaf][i]`` is the
      gradient of example i's loss.
    """
    single = batch_value_and_grad(model, loss, resolve_grad_mode(grad, mode, "per_example_value_and_grad"))
    check_is_layer(model, "per_example_value_and_grad")
    check_is_loss(loss, "per_example_value_and_grad")

    def f(params, x, y, key=None):
        check_batch(model, x, y)
        check_params(model, params, x)
        if key is None:
            return jax.vmap(single, in_axes=(None, 0, 0))(params, x, y)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(jnp.shape(x)[0]))
        return jax.vmap(single, in_axes=(None, 0, 0, 0))(params, x, y, keys)

    return f


def per_example_grads(model, loss, *, grad: str = "manual", mode: str | None = None) -> Callable:
    """``f(params, x, y, key=None) -> grads``: every example's gradient, stacked.

    ``per_example_value_and_grad`` without the values: each leaf of ``grads``
    gains a leading batch axis, ``grads[leaf][i]`` the gradient of example i's
    loss (jax.vmap over single examples; with a key, example i gets
    ``jax.random.fold_in(key, i)``). Before fbp 0.2.0 this returned
    ``(values, grads)``: use ``per_example_value_and_grad`` for both.
    """
    both = per_example_value_and_grad(model, loss, grad=resolve_grad_mode(grad, mode, "per_example_grads"))

    def f(params, x, y, key=None):
        return both(params, x, y, key)[1]

    return f


def _averaged_per_example(model, loss, grad: str) -> Callable:
    """Mean of per-example gradients as one backward pass over the batch.

    Example i's gradient is backward(cache, e_i dpred_i), linear in dpred_i, and
    the examples do not mix; so the mean over i is backward(cache, dpred / B):
    each layer's backward sums the outer products over the batch in one matmul
    instead of materialising B of them.
    """
    pullback = make_pullback(model, grad)

    def averaged(params, x, y, key=None):
        check_batch(model, x, y)
        pred, backward = pullback(params, x, key)
        values, dpred = per_example_loss(loss, pred, y)
        return values.mean(), backward(dpred / values.shape[0])

    return averaged


def _masked_value_and_grad(model, loss, grad: str, per_example: bool | str) -> Callable:
    """``f(params, x, y, key, mask) -> (mean loss, mean gradient)`` over the examples where ``mask``.

    Each example's loss and dpred alone, weighted by ``mask / count``, then one backward over the
    batch (``_averaged_per_example``'s argument: backward is linear in dpred and examples do not
    mix); the vmap reference (and the fast path of a model drawing random numbers from ``key``)
    weighs the stacked per-example gradients instead.
    """
    pullback = make_pullback(model, grad)
    stacked = per_example_value_and_grad(model, loss, grad=grad)

    def masked(params, x, y, key, mask):
        check_batch(model, x, y)
        check_mask(model, x, mask)
        x, y, keep = mask_examples(x, y, mask)
        vmapped = per_example == "vmap" or (
            per_example is True and not batch_forward_is_per_example(model, params, x, key)
        )
        if vmapped:
            values, grads = stacked(params, x, y, key)
            weights = masked_mean_weights(keep, values.dtype)
            values = jnp.where(keep, values, jnp.zeros((), values.dtype))
            return weights @ values, jax.tree_util.tree_map(
                lambda g: jnp.tensordot(weights.astype(g.dtype), g, 1), grads
            )
        pred, backward = pullback(params, x, key)
        values, dpred = per_example_loss(loss, pred, y)
        weights = masked_mean_weights(keep, values.dtype)
        values = jnp.where(keep, values, jnp.zeros((), values.dtype))  # a zero input's loss could still be inf
        return weights @ values, backward(scale_examples(dpred, weights))

    return masked


def value_and_grad(
    model, loss, *, grad: str = "manual", per_example: bool | str = False, mode: str | None = None
) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)``, ``grads`` shaped like ``params``.

    Args:
      model: any layer (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      grad: ``"manual"`` (forward, loss forward/backward, then ``model.backward``),
        ``"autodiff"`` (jax.value_and_grad over ``model.apply``) or
        ``"custom_vjp"`` (jax.value_and_grad through ``with_manual_vjp``).
      per_example: ``False``: the batch gradient. ``True`` (the fast path): the
        mean of every example's own gradient, each example's loss and dpred
        computed alone, then one backward over the batch with dpred / batch,
        which sums the per-example gradients inside each layer: as fast as the
        batch step, no per-example gradient materialised. ``"vmap"``: the same
        mean by jax.vmap over single examples (``per_example_value_and_grad``),
        materialising every per-example gradient: the reference. ``True`` also
        takes the vmap path when the model draws random numbers from a given
        key, so that example i gets the key fold_in(key, i) on both paths. All
        equal the batch gradient, since the batch loss is the mean of the
        per-example losses.
      mode: deprecated spelling of ``grad``.

    The returned ``f`` also takes ``mask: (batch,)`` (bool; None: every example): the loss and
    gradient are then the mean over the examples where ``mask`` is True, each example's loss
    weighted alone (for padded batches, e.g. Poisson sampling). A masked example contributes
    nothing: its x and y are replaced by zeros before any arithmetic, and its weight is zero.
    """
    grad = resolve_grad_mode(grad, mode, "value_and_grad")
    check_per_example(per_example, "value_and_grad")
    check_is_layer(model, "value_and_grad")
    check_is_loss(loss, "value_and_grad")
    masked = _masked_value_and_grad(model, loss, grad, per_example)
    if per_example is False:
        batch = batch_value_and_grad(model, loss, grad)

        def checked(params, x, y, key=None, mask=None):
            check_params(model, params, x)
            if mask is not None:
                return masked(params, x, y, key, mask)
            return batch(params, x, y, key)

        return checked
    stacked = per_example_value_and_grad(model, loss, grad=grad)
    fast = _averaged_per_example(model, loss, grad)

    def averaged(params, x, y, key=None, mask=None):
        check_params(model, params, x)
        if mask is not None:
            return masked(params, x, y, key, mask)
        if per_example is True and batch_forward_is_per_example(model, params, x, key):
            return fast(params, x, y, key)
        values, grads = stacked(params, x, y, key)
        return values.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)

    return averaged
