"""The pieces every gradient path is built from: a pullback by mode, each example's loss alone, masking."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.layers.base import uses_key


def with_manual_vjp(model) -> Callable:
    """``f(params, x, key=None) = model.apply(params, x)`` whose VJP is ``model.backward``.

    The forward runs ``model.forward`` and keeps its cache as the residual, so
    ``jax.grad``, optax and any JAX transformation use the hand-written gradients.
    A discrete input (Embedding ids) gets a zero cotangent.
    """

    @jax.custom_vjp
    def f(params, x, key):
        return model.apply(params, x, key=key)

    def fwd(params, x, key):
        y, cache = model.forward(params, x, key=key)
        return y, (params, cache)

    def bwd(residuals, dy):
        params, cache = residuals
        dparams, dx = model.backward(params, cache, dy)
        return dparams, dx, None

    f.defvjp(fwd, bwd)

    def apply(params, x, key=None):
        return f(params, x, key)

    return apply


def apply_of(model) -> Callable:
    """``model.apply`` as ``f(params, x, key)``, the signature ``with_manual_vjp`` returns."""
    return lambda params, x, key=None: model.apply(params, x, key=key)


def make_pullback(model, grad: str) -> Callable:
    """``f(params, x, key) -> (pred, backward)``, ``backward(dpred) -> dparams``, by ``grad`` (checked by the caller)."""

    def pullback(params, x, key):
        if grad == "manual":
            pred, cache = model.forward(params, x, key=key)
            return pred, lambda dpred: model.backward(params, cache, dpred)[0]
        apply = with_manual_vjp(model) if grad == "custom_vjp" else apply_of(model)
        pred, vjp = jax.vjp(lambda p: apply(p, x, key), params)
        return pred, lambda dpred: vjp(dpred)[0]

    return pullback


def batch_value_and_grad(model, loss, grad: str) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)`` over the batch, by ``grad`` (checked by the caller)."""
    if grad == "manual":

        def manual(params, x, y, key=None):
            pred, cache = model.forward(params, x, key=key)  # forward pass, keeping the cache
            value, loss_cache = loss.forward(pred, y)
            dpred = loss.backward(loss_cache)  # dL/dpred
            dparams, _ = model.backward(params, cache, dpred)  # the chain rule, layer by layer
            return value, dparams

        return manual
    apply = with_manual_vjp(model) if grad == "custom_vjp" else apply_of(model)

    def by_jax(params, x, y, key=None):
        return jax.value_and_grad(lambda p: loss(apply(p, x, key), y))(params)

    return by_jax


def per_example_loss(loss, pred, y):
    """Each example's own loss and its gradient: values ``(batch,)``, dpred shaped like pred.

    The loss of example i alone is a batch of one, so dpred[i] is exactly the
    gradient of example i's loss with respect to its own prediction.
    """

    def one(pred_i, y_i):
        value, cache = loss.forward(pred_i, y_i)
        return value, loss.backward(cache)

    return jax.vmap(one)(pred, y)


def batch_forward_is_per_example(model, params, x, key) -> bool:
    """Whether one forward pass over the batch equals the vmapped single-example forwards.

    It does for fbp layers, which treat leading axes as independent examples,
    unless randomness is drawn: vmap gives example i the key fold_in(key, i).
    """
    return key is None or not uses_key(model, params, x, key)


def mask_examples(x, y, mask):
    """``(x, y, keep)``: masked examples' rows of x and y replaced by zeros, ``keep: (batch,)`` bool.

    What a masked example holds then never reaches the arithmetic (not even a NaN in the padding),
    so its values change no result, bit for bit; its weight is zero everywhere after.
    """
    keep = jnp.asarray(mask).astype(bool)

    def zero_masked(a):
        a = jnp.asarray(a)
        return jnp.where(keep.reshape(-1, *([1] * (a.ndim - 1))), a, jnp.zeros((), a.dtype))

    return zero_masked(x), zero_masked(y), keep


def masked_mean_weights(keep, dtype) -> jax.Array:
    """``keep / max(1, count)``: each real example's weight in the mean over real examples (0 when none)."""
    keep = keep.astype(dtype)
    return keep / jnp.maximum(jnp.sum(keep), 1)
