"""The layer protocol and the small helpers every layer shares.

A layer is a frozen dataclass of hyper-parameters with four pure methods::

    params = layer.init(key, x)                    # x: array or jax.ShapeDtypeStruct
    y = layer.apply(params, x)                     # forward only
    y, cache = layer.forward(params, x)            # cache: what backward needs
    dparams, dx = layer.backward(params, cache, dy)  # hand-written VJP

Layers that draw random numbers (Dropout) set ``takes_key = True`` and accept
``key=`` in ``apply``/``forward``; combinators pass a key only to such layers,
so any object with the four methods composes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays: {} for layers without parameters
Cache = Any  # a pytree of arrays: whatever backward needs


class Layer:
    """Optional base class: a default ``apply`` and a readable name.

    Subclasses are frozen dataclasses that implement ``init``, ``forward`` and
    ``backward``. ``apply`` defaults to ``forward`` without the cache; layers
    override it when the forward pass can skip work the cache needs.
    """

    takes_key: bool = False

    def init(self, key: jax.Array, x) -> Params:
        """Parameterless by default."""
        del key, x
        return {}

    def apply(self, params: Params, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        if self.takes_key:
            return self.forward(params, x, key=key)[0]
        return self.forward(params, x)[0]

    def __call__(self, params: Params, x: jax.Array, **kwargs) -> jax.Array:
        return self.apply(params, x, **kwargs)

    @property
    def name(self) -> str:
        return describe(self)


def describe(layer: Any) -> str:
    """Short name for messages: the class and its non-default fields, e.g. ``Dense(10)``."""
    if not dataclasses.is_dataclass(layer):
        return type(layer).__name__
    parts = []
    for field in dataclasses.fields(layer):
        if not field.repr:
            continue
        value = getattr(layer, field.name)
        has_default = field.default is not dataclasses.MISSING
        if has_default and value == field.default:
            continue
        if isinstance(value, (tuple, list)) and value and hasattr(value[0], "backward"):
            text = f"{len(value)} layers"
        elif hasattr(value, "backward"):
            text = describe(value)
        else:
            text = repr(value)
        parts.append(text if not has_default else f"{field.name}={text}")
    return f"{type(layer).__name__}({', '.join(parts)})"


def call_forward(layer: Any, params: Params, x: jax.Array, key: jax.Array | None):
    """``layer.forward`` with ``key`` passed only to layers that take one."""
    if getattr(layer, "takes_key", False):
        return layer.forward(params, x, key=key)
    return layer.forward(params, x)


def call_apply(layer: Any, params: Params, x: jax.Array, key: jax.Array | None):
    """``layer.apply`` with ``key`` passed only to layers that take one."""
    if getattr(layer, "takes_key", False):
        return layer.apply(params, x, key=key)
    return layer.apply(params, x)


def sum_leading(a: jax.Array, keep: int) -> jax.Array:
    """Sum over all axes but the last ``keep``: parameter gradients add over examples."""
    return a.sum(axis=tuple(range(a.ndim - keep))) if a.ndim > keep else a


def check_array(layer: Any, x, *, min_ndim: int = 1, what: str = "x") -> None:
    """Raise TypeError unless ``x`` is an array-like with a shape and a dtype of rank >= min_ndim."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{describe(layer)}: expected {what} to be an array, got {type(x).__name__}")
    if len(x.shape) < min_ndim:
        raise ValueError(
            f"{describe(layer)}: expected {what} of rank >= {min_ndim}, got shape {tuple(x.shape)}"
        )


def check_float(layer: Any, x, *, what: str = "x") -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{describe(layer)}: expected a floating-point {what}, got dtype {x.dtype}; "
            "cast with x.astype(jnp.float32)"
        )


def param_dtype(x) -> Any:
    """Parameters follow the input's float dtype (float64 input -> float64 params)."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(()).dtype


def per_example_outer_sq_norms(a: jax.Array, b: jax.Array) -> jax.Array:
    """``||sum_t a[i, t]^T b[i, t]||_F^2`` for every example i, without the matrices when cheaper.

    The parameter gradient of a Dense or Conv2D layer for one example is such a
    sum of outer products (t runs over positions: sequence steps, output pixels).
    One position: the norm of an outer product is the product of the norms.
    Several: the Gram form ``sum_{t,s} (a_t . a_s)(b_t . b_s)`` (Goodfellow 2015;
    Li et al. 2021, ghost clipping) or the matrix itself, whichever costs less.

    Args:
      a: ``(batch, T, I)``. b: ``(batch, T, O)``.

    Returns:
      ``(batch,)`` squared Frobenius norms, in at least float32.
    """
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    steps, n_in, n_out = a.shape[1], a.shape[2], b.shape[2]
    if steps == 1:
        return jnp.sum(a * a, axis=(1, 2)) * jnp.sum(b * b, axis=(1, 2))
    if steps * (n_in + n_out) < n_in * n_out:
        gram_a = jnp.einsum("bti,bsi->bts", a, a)
        gram_b = jnp.einsum("bto,bso->bts", b, b)
        return jnp.sum(gram_a * gram_b, axis=(1, 2))
    g = jnp.einsum("bti,bto->bio", a, b)
    return jnp.sum(g * g, axis=(1, 2))


def call_per_example_sq_norms(layer: Any, params: Params, cache: Cache, dy: jax.Array) -> jax.Array:
    """Squared L2 norm of each example's parameter gradient (all leaves together): ``(batch,)``.

    ``dy`` is ``(batch, ...)``, the gradient of the loss of each example on its
    own; the cache comes from ``layer.forward`` on the batch. Uses the layer's
    ``per_example_sq_norms(params, cache, dy)`` when it has one (a few
    reductions, no per-example gradients); a layer without parameters gives
    zeros; any other layer falls back to jax.vmap of its backward over single
    examples, which needs every cache leaf to have the batch as its first axis.
    """
    batch = dy.shape[0]
    zeros = jnp.zeros((batch,), jnp.promote_types(dy.dtype, jnp.float32))
    if not jax.tree_util.tree_leaves(params):
        return zeros
    hook = getattr(layer, "per_example_sq_norms", None)
    if hook is not None:
        return hook(params, cache, dy)

    def one(cache_i, dy_i):
        dparams, _ = layer.backward(params, cache_i, dy_i)
        return sum(jnp.sum(jnp.square(g.astype(zeros.dtype))) for g in jax.tree_util.tree_leaves(dparams))

    return jax.vmap(one)(cache, dy)


def scale_examples(dy: jax.Array, weights: jax.Array) -> jax.Array:
    """``dy[i] * weights[i]`` for every example i: ``dy: (batch, ...)``, ``weights: (batch,)``."""
    return dy * weights.astype(dy.dtype).reshape(-1, *([1] * (dy.ndim - 1)))


def call_per_example_backward(layer: Any, params: Params, cache: Cache, dy: jax.Array):
    """One backward walk that also yields what per-example clipping needs.

    Returns ``(sq_norms, dx, weighted_grads)``: ``sq_norms: (batch,)`` the
    squared norm of each example's parameter gradient (``call_per_example_sq_norms``),
    ``dx`` as from ``layer.backward``, and ``weighted_grads(weights)`` = sum_i
    weights[i] g_i, shaped like params. Examples do not mix and backward is
    linear in dy, so scaling example i's dy by weights[i] at every layer scales
    its gradient: ``weighted_grads`` reuses each layer's dy from this walk
    (book-keeping, Bu et al. 2022) instead of walking back again. Under jit,
    XLA keeps only dx of the first call to each backward and only the
    parameter gradients of the second. A layer may provide
    ``per_example_weighted_grads(params, cache, dy, weights)`` to weigh
    something cheaper than dy (Dense and Conv2D weigh their input). Combinators
    provide their own ``per_example_backward(params, cache, dy)`` that recurses.
    """
    own = getattr(layer, "per_example_backward", None)
    if own is not None:
        return own(params, cache, dy)
    _, dx = layer.backward(params, cache, dy)
    hook = getattr(layer, "per_example_weighted_grads", None)

    def weighted_grads(weights):
        if hook is not None:
            return hook(params, cache, dy, weights)
        return layer.backward(params, cache, scale_examples(dy, weights))[0]

    return call_per_example_sq_norms(layer, params, cache, dy), dx, weighted_grads
