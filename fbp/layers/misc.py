"""Layers that reshape, normalise, drop or look up: Flatten, LayerNorm, Dropout, Embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers.base import Layer, check_array, check_float, describe, param_dtype, sum_leading


@dataclass(frozen=True)
class Flatten(Layer):
    """Merge the last ``num_axes`` axes into one: ``(..., H, W, C) -> (..., H*W*C)``.

    The number of feature axes is fixed (default 3, an NHWC image), so the same
    layer works on a batch and on one example under vmap. Cache: backward needs
    only the feature shape, so the cache is a zero-size array of shape (0, H, W, C)
    that records it and costs no memory.
    """

    num_axes: int = 3

    def _check(self, x):
        check_array(self, x, min_ndim=self.num_axes)

    def forward(self, params, x):
        self._check(x)
        lead = x.shape[: x.ndim - self.num_axes]
        feature_shape = x.shape[x.ndim - self.num_axes :]
        return x.reshape(*lead, -1), jnp.zeros((0, *feature_shape), x.dtype)

    def backward(self, params, shape_record, dy):
        return {}, dy.reshape(*dy.shape[:-1], *shape_record.shape[1:])


@dataclass(frozen=True)
class LayerNorm(Layer):
    """y = scale * (x - mean) / sqrt(var + eps) + bias over the last axis (Ba et al. 2016).

    Shapes: ``x: (..., features)``, ``scale, bias: (features,)``.
    Cache: (xhat, 1/std). With g = dy * scale:
    dx = (g - mean(g) - xhat * mean(g * xhat)) / std.
    """

    epsilon: float = 1e-5

    def init(self, key, x):
        check_array(self, x)
        features = x.shape[-1]
        dtype = param_dtype(x)
        return {"scale": jnp.ones((features,), dtype), "bias": jnp.zeros((features,), dtype)}

    def forward(self, params, x):
        check_array(self, x)
        check_float(self, x)
        if x.shape[-1] != params["scale"].shape[0]:
            raise ValueError(
                f"{describe(self)}: expected x[..., {params['scale'].shape[0]}], got shape {tuple(x.shape)}"
            )
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


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: y = x * mask / (1 - rate), mask ~ Bernoulli(1 - rate).

    Randomness is explicit: ``forward(params, x, key=key)``. Without a key (the
    default) the layer is the identity: inference mode. Cache: the scaled mask
    (None in inference mode), since dx = dy * mask / (1 - rate).
    """

    rate: float = 0.5
    takes_key = True

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate!r}")

    def forward(self, params, x, *, key=None):
        check_array(self, x, min_ndim=0)
        check_float(self, x)
        if key is None or self.rate == 0.0:
            return x, None
        keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        scaled_mask = keep.astype(x.dtype) / (1.0 - self.rate)
        return x * scaled_mask, scaled_mask

    def backward(self, params, scaled_mask, dy):
        return {}, dy if scaled_mask is None else dy * scaled_mask


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and isinstance(x, (np.ndarray, jax.Array))


@dataclass(frozen=True)
class Embedding(Layer):
    """y = W[ids]: a lookup table. ``ids: (...)`` integers, ``W: (num_embeddings, features)``,
    ``y: (..., features)``.

    Cache: ids. dW scatters dy into the looked-up rows (rows that repeat add up);
    the input is discrete, so dx is None.
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def init(self, key, x):
        self._check_ids(x)
        return {"W": jax.random.normal(key, (self.num_embeddings, self.features), self.dtype)}

    def _check_ids(self, x):
        check_array(self, x, min_ndim=0, what="ids")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{describe(self)}: expected integer ids, got dtype {x.dtype}; "
                "Embedding looks up rows, it does not take float features"
            )
        if _is_concrete(x) and x.size:
            values = np.asarray(x)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(
                    f"{describe(self)}: ids must lie in [0, {self.num_embeddings}), got values in [{low}, {high}]"
                )

    def forward(self, params, ids):
        self._check_ids(ids)
        return jnp.take(params["W"], ids, axis=0), ids

    def backward(self, params, ids, dy):
        dW = jnp.zeros_like(params["W"]).at[ids.reshape(-1)].add(dy.reshape(-1, self.features))
        return {"W": dW}, None

    def per_example_sq_norms(self, params, ids, dy):
        """``||dW_i||^2`` for every example i of ``ids: (batch, ...)``.

        Row r of dW_i sums dy over the positions whose id is r, so
        ||dW_i||^2 = sum_{t,s} [id_t == id_s] (dy_t . dy_s): a masked Gram matrix.
        """
        batch = ids.shape[0]
        ids2 = ids.reshape(batch, -1)
        dy3 = dy.reshape(batch, -1, self.features).astype(jnp.promote_types(dy.dtype, jnp.float32))
        if ids2.shape[1] == 1:
            return jnp.sum(dy3 * dy3, axis=(1, 2))
        same = ids2[:, :, None] == ids2[:, None, :]
        gram = jnp.einsum("btf,bsf->bts", dy3, dy3)
        return jnp.sum(jnp.where(same, gram, jnp.zeros_like(gram)), axis=(1, 2))
