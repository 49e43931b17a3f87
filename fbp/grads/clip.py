"""Per-example clipping for DP-SGD: ghost clipping through the layers' hooks, or the stacked reference."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.grads.pieces import batch_forward_is_per_example, mask_examples, per_example_loss
from fbp.grads.validate import (
    check_batch,
    check_is_layer,
    check_is_loss,
    check_mask,
    check_normalize_by,
    check_params,
    check_per_example,
    resolve_grad_mode,
)
from fbp.grads.value import per_example_value_and_grad
from fbp.layers.base import call_per_example_backward


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
    """``min(1, C / ||g_i||)``: the factor that clips each example's gradient to norm C."""
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def stacked_norms(grads) -> jax.Array:
    """Each example's gradient norm from stacked per-example gradients: ``(batch,)`` in at least float32."""

    def sq_norms(g):
        g = g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32))
        return jnp.sum(g * g, axis=1)

    return jnp.sqrt(sum(sq_norms(g) for g in jax.tree_util.tree_leaves(grads)))


def clip_and_average(grads, clip_norm: float):
    """Clip each example's gradient to global L2 norm ``clip_norm``, then average.

    Args:
      grads: per-example gradients, every leaf (batch, ...).
      clip_norm: the bound C.

    Returns:
      (mean of g_i * min(1, C / ||g_i||), per-example norms (batch,)).
    """

    norms = stacked_norms(grads)
    factor = clip_factors(norms, clip_norm)
    mean = jax.tree_util.tree_map(lambda g: jnp.tensordot(factor.astype(g.dtype), g, axes=1) / g.shape[0], grads)
    return mean, norms


def clipped_value_and_grad(
    model,
    loss,
    clip_norm: float,
    *,
    grad: str = "manual",
    per_example: bool | str = True,
    normalize_by: float | None = None,
    mode: str | None = None,
) -> Callable:
    """``f(params, x, y, key=None, mask=None) -> (loss value, clipped mean gradient, norms)`` for DP-SGD.

    The gradient is ``mean_i g_i min(1, C / ||g_i||)`` with g_i example i's
    gradient and C = ``clip_norm``; ``norms: (batch,)`` holds every ||g_i||.

    With ``mask: (batch,)`` (bool, True for a real example: padded batches such as Poisson
    sampling's), only the examples where ``mask`` count: the gradient is the sum of their clipped
    gradients divided by ``normalize_by`` (or by their number), the loss value their mean loss,
    and a masked example's norm is 0. A masked example contributes nothing, bit for bit: its x and
    y are replaced by zeros before any arithmetic and its weight is zero.

    Args:
      model, loss, grad: as ``value_and_grad``; ``mode``: deprecated spelling of ``grad``.
      clip_norm: the bound C.
      normalize_by: the clipped sum is divided by this; None: by the number of examples (the
        unmasked ones with a mask), i.e. the mean. DP-SGD with Poisson sampling divides by the
        EXPECTED batch size q N, a constant, as the privacy accountant assumes (dividing by the
        drawn batch size would make the noise depend on the data); JAX-Privacy's ``normalize_by``.
      per_example: ``True`` (the fast path): with ``grad="manual"`` no g_i is
        materialised (ghost clipping, Li et al. 2021): one backward walk over
        the batch gets ||g_i||^2 from each layer's ``per_example_sq_norms`` (its
        cache and dy; for Dense, ||x_i|| ||dy_i||), the factors follow, and each
        layer's gradient with its dy scaled by factor_i / B is exactly the
        clipped mean (the dy's of the walk are reused, so there is no second
        walk: ``call_per_example_backward``). ``"vmap"``: the g_i from
        ``per_example_value_and_grad``, clipped and averaged: the reference,
        also taken for ``True`` with the autodiff modes, with a model that
        draws random numbers from a given key, or with a model that has
        neither ``per_example_backward`` nor ``per_example_sq_norms``.
        ``False`` is refused: clipping needs per-example gradients.
    """
    grad = resolve_grad_mode(grad, mode, "clipped_value_and_grad")
    check_per_example(per_example, "clipped_value_and_grad")
    check_is_layer(model, "clipped_value_and_grad")
    check_is_loss(loss, "clipped_value_and_grad")
    if per_example is False:
        raise ValueError("clipping needs per-example gradients: pass per_example=True or 'vmap'")
    check_normalize_by(normalize_by, "clipped_value_and_grad")
    stacked = per_example_value_and_grad(model, loss, grad=grad)
    hooks = ("per_example_backward", "per_example_sq_norms")
    ghost = per_example is True and grad == "manual" and any(callable(getattr(model, h, None)) for h in hooks)

    def clipped(params, x, y, key=None, mask=None):
        check_params(model, params, x)
        keep = None
        if mask is not None:
            check_batch(model, x, y)
            check_mask(model, x, mask)
            x, y, keep = mask_examples(x, y, mask)
        if not (ghost and batch_forward_is_per_example(model, params, x, key)):
            values, grads = stacked(params, x, y, key)
            if keep is None and normalize_by is None:
                grads, norms = clip_and_average(grads, clip_norm)
                return values.mean(), grads, norms
            norms = stacked_norms(grads)
            factors, value, denominator = masked_factors(norms, values, keep, clip_norm, normalize_by)
            grads = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors.astype(g.dtype), g, 1) / denominator, grads)
            return value, grads, norms if keep is None else jnp.where(keep, norms, 0)
        check_batch(model, x, y)
        pred, cache = model.forward(params, x, key=key)
        values, dpred = per_example_loss(loss, pred, y)
        sq_norms, _, weighted_grads = call_per_example_backward(model, params, cache, dpred)
        norms = jnp.sqrt(sq_norms)
        if keep is None and normalize_by is None:
            return values.mean(), weighted_grads(clip_factors(norms, clip_norm) / values.shape[0]), norms
        factors, value, denominator = masked_factors(norms, values, keep, clip_norm, normalize_by)
        return value, weighted_grads(factors / denominator), norms if keep is None else jnp.where(keep, norms, 0)

    return clipped


def masked_factors(norms, values, keep, clip_norm: float, normalize_by: float | None):
    """``(factors, loss value, denominator)``: the clip factors, zero where masked; the mean loss over the
    real examples; what the clipped sum is divided by (``normalize_by``, else the number of real examples)."""
    factors = clip_factors(norms, clip_norm)
    if keep is None:
        count = values.shape[0]
        value = values.mean()
    else:
        factors = jnp.where(keep, factors, jnp.zeros((), factors.dtype))
        count = jnp.maximum(jnp.sum(keep.astype(values.dtype)), 1)
        value = jnp.sum(jnp.where(keep, values, jnp.zeros((), values.dtype))) / count
    return factors, value, count if normalize_by is None else normalize_by
