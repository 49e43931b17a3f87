"""Window helpers of the convolutions and pools, on ``(N, *S, C)`` arrays with any number of spatial axes S.

A convolution or pooling window at offset o and stride s reads ``x[:, o + s a, :]`` over output
positions a (``window_slice``); its backward writes back through the transpose (``place``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fbp.layers.base import check_array, check_float


def freeze(v):
    """Lists to tuples, recursively: a layer's fields must be hashable (layers are static under jit)."""
    return tuple(freeze(e) for e in v) if isinstance(v, (list, tuple)) else v


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def spatial_ints(v, n: int, what: str, owner: str) -> tuple[int, ...]:
    """An int, or one per spatial axis: ``n`` positive ints."""
    ints = (v,) * n if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(ints) != n or not all(is_count(k) and k >= 1 for k in ints):
        kind = "int" if n == 1 else f"int or a tuple of {n} of them"
        raise ValueError(f"{owner}: {what} must be a positive {kind}, got {v!r}")
    return ints


def as_batch(layer, x, spatial: int):
    """(..., *S, C) -> ((N, *S, C), leading shape), after checking rank and dtype."""
    check_array(layer, x, min_ndim=spatial + 1)
    check_float(layer, x)
    lead = x.shape[: x.ndim - spatial - 1]
    return x.reshape(-1, *x.shape[x.ndim - spatial - 1 :]), lead


def window_slice(x, offset, stride, out_shape):
    """``x[:, o + s a, :]`` over output positions a, on each spatial axis of ``x: (N, *S, C)``."""
    window = tuple(slice(o, o + s * (m - 1) + 1, s) for o, s, m in zip(offset, stride, out_shape))
    return x[(slice(None), *window, slice(None))]


def place(c, offset, stride, size):
    """Scatter ``c[:, a]`` to ``out[:, offset + stride a]`` in an ``(N, *size, C)`` array of zeros.

    The transpose of ``window_slice``, as one pad (interior padding spaces the strided elements).
    """
    config = [(0, 0, 0)]
    for o, s, m, n in zip(offset, stride, c.shape[1:-1], size):
        config.append((o, n - o - s * (m - 1) - 1, s - 1))
    config.append((0, 0, 0))
    return lax.pad(c, jnp.zeros((), c.dtype), config)
