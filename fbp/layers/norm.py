"""LayerNorm: normalise each example's features to zero mean and unit variance, then scale and shift."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fbp.layers.base import Layer, check_array, check_features, check_float, describe, param_dtype, sum_leading


@dataclass(frozen=True)
class LayerNorm(Layer):
    """y = scale * (x - mean) / sqrt(var + eps) + bias over the last axis (Ba et al. 2016).

    Shapes: ``x: (..., features)``, ``scale, bias: (features,)``.
    Cache: (xhat, 1/std). With g = dy * scale:
    dx = (g - mean(g) - xhat * mean(g * xhat)) / std.
    """

    epsilon: float = 1e-5

    def __post_init__(self):
        value = self.epsilon
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"LayerNorm: epsilon must be a positive number (it keeps 1/std finite), got {value!r}")

    def _check_features(self, x):
        if x.shape[-1] == 0:
            raise ValueError(
                f"{describe(self)}: expected at least one feature to normalise over, got x of shape {tuple(x.shape)}"
            )

    def init(self, key, x):
        check_array(self, x)
        self._check_features(x)
        features = x.shape[-1]
        dtype = param_dtype(x)
        return {"scale": jnp.ones((features,), dtype), "bias": jnp.zeros((features,), dtype)}

    def forward(self, params, x, *, key=None):
        check_array(self, x)
        check_float(self, x)
        check_features(self, x, params["scale"].shape[0])
        self._check_features(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        inv_std = jax.lax.rsqrt((centered * centered).mean(axis=-1, keepdims=True) + self.epsilon)
        xhat = centered * inv_std
        scale, bias = (jax.lax.broadcast_to_rank(params[name], x.ndim) for name in ("scale", "bias"))
        return xhat * scale + bias, (xhat, inv_std)

    def backward(self, params, cache, dy):
        xhat, inv_std = cache
        g = dy * jax.lax.broadcast_to_rank(params["scale"], dy.ndim)
        dx = inv_std * (
            g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
        )
        dparams = {"scale": sum_leading(dy * xhat, 1), "bias": sum_leading(dy, 1)}
        return dparams, dx

    def per_example_sq_norms(self, params, cache, dy):
        """``||dscale_i||^2 + ||dbias_i||^2`` for every example i of ``dy: (batch, ..., features)``."""
        xhat, _ = cache
        batch, features = dy.shape[0], dy.shape[-1]
        dtype = jnp.promote_types(dy.dtype, jnp.float32)
        dscale = (dy * xhat).reshape(batch, -1, features).sum(axis=1).astype(dtype)
        dbias = dy.reshape(batch, -1, features).sum(axis=1).astype(dtype)
        return jnp.sum(dscale * dscale, axis=1) + jnp.sum(dbias * dbias, axis=1)
