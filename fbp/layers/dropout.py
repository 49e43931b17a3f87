"""Dropout: the one layer that draws random numbers, from the key it is given."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fbp.layers.base import Layer, check_array, check_float


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: y = x * mask / (1 - rate), mask ~ Bernoulli(1 - rate). Any shape.

    Randomness is explicit: ``forward(params, x, key=key)``. Without a key (the
    default) the layer is the identity: inference mode. Cache: the scaled mask
    (None in inference mode), since dx = dy * mask / (1 - rate).

    The mask depends on the key and x's shape only: it is drawn from float32
    uniforms whatever x's dtype and whether x64 is on (``jax.random.bernoulli``
    draws in the default float type, so its mask changes under x64), so a
    float64 rerun of the same step (the gradient checker's) sees the same mask.
    """

    rate: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate!r}")

    def forward(self, params, x, *, key=None):
        check_array(self, x, min_ndim=0)
        check_float(self, x)
        if key is None or self.rate == 0.0:
            return x, None
        keep = jax.random.uniform(key, x.shape, jnp.float32) < 1.0 - self.rate  # bernoulli's draw, fixed to float32
        scaled_mask = keep.astype(x.dtype) / (1.0 - self.rate)
        return x * scaled_mask, scaled_mask

    def backward(self, params, scaled_mask, dy):
        return {}, dy if scaled_mask is None else dy * scaled_mask
