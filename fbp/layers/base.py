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
