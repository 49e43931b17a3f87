"""Flatten: merge the feature axes into one, e.g. an image into a vector before Dense."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from fbp.layers.base import Layer, check_array


@dataclass(frozen=True)
class Flatten(Layer):
    """Merge the last ``num_axes`` axes into one: ``(..., H, W, C) -> (..., H*W*C)``.

    The number of feature axes is fixed (default 3, an NHWC image), so the same
    layer works on a batch and on one example under vmap. Cache: backward needs
    only the feature shape, so the cache is a zero-size array of shape (0, H, W, C)
    that records it and costs no memory.
    """

    num_axes: int = 3

    def forward(self, params, x, *, key=None):
        check_array(self, x, min_ndim=self.num_axes)
        lead = x.shape[: x.ndim - self.num_axes]
        feature_shape = x.shape[x.ndim - self.num_axes :]
        return x.reshape(*lead, -1), jnp.zeros((0, *feature_shape), x.dtype)

    def backward(self, params, shape_record, dy):
        return {}, dy.reshape(*dy.shape[:-1], *shape_record.shape[1:])
