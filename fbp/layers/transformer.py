"""The pieces of a GPT-style model: RMSNorm, PositionalEmbedding and the pre-norm TransformerBlock.

A language model is then a Sequential::

    fbp.Sequential([fbp.Embedding(V, d), fbp.PositionalEmbedding(T),
                    fbp.TransformerBlock(h), ..., fbp.RMSNorm(), fbp.Dense(V)])
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import jax
import jax.numpy as jnp

from fbp.layers.activations import GELU
from fbp.layers.attention import MultiHeadAttention
from fbp.layers.base import Child, Layer, check_array, check_features, check_float, describe, param_dtype, sum_leading
from fbp.layers.combinators import Residual, Sequential
from fbp.layers.dense import Dense


def _check_batched(layer, dy, min_ndim: int) -> None:
    if dy.ndim < min_ndim:
        raise ValueError(
            f"{describe(layer)}: per-example gradients need a batch axis, got dy of shape {tuple(dy.shape)}"
        )


@dataclass(frozen=True)
class RMSNorm(Layer):
    """y = scale * x / sqrt(mean(x^2) + eps) over the last axis (Zhang & Sennrich 2019).

    Shapes: ``x: (..., features)``, ``scale: (features,)``. Cache: (xhat, 1/rms)
    with xhat = x / rms. With g = dy * scale: dx = (g - xhat * mean(g * xhat)) / rms,
    dscale = sum dy * xhat.
    """

    epsilon: float = 1e-6

    def init(self, key, x):
        check_array(self, x)
        return {"scale": jnp.ones((x.shape[-1],), param_dtype(x))}

    def forward(self, params, x, *, key=None):
        """``key`` is ignored (no randomness); provided for compatibility."""
        check_array(self, x)
        check_float(self, x)
        check_features(self, x, params["scale"].shape[0])
        inv_rms = jax.lax.rsqrt((x * x).mean(axis=-1, keepdims=True) + self.epsilon)
        xhat = x * inv_rms
        return xhat * jax.lax.broadcast_to_rank(params["scale"], x.ndim), (xhat, inv_rms)

    def apply(self, params, x, *, key=None):
        return self.forward(params, x)[0]

    def backward(self, params, cache, dy):
        xhat, inv_rms = cache
        g = dy * jax.lax.broadcast_to_rank(params["scale"], dy.ndim)
        dx = inv_rms * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        return {"scale": sum_leading(dy * xhat, 1)}, dx

    def _per_example_dscale(self, cache, dy):
        _check_batched(self, dy, 2)
        xhat, _ = cache
        batch, features = dy.shape[0], dy.shape[-1]
        return (dy * xhat).reshape(batch, -1, features).sum(axis=1)

    def per_example_sq_norms(self, params, cache, dy):
        """``||dscale_i||^2`` for every example i of ``dy: (batch, ..., features)``."""
        dscale = self._per_example_dscale(cache, dy).astype(jnp.promote_types(dy.dtype, jnp.float32))
        return jnp.sum(dscale * dscale, axis=1)

    def per_example_weighted_grads(self, params, cache, dy, weights):
        """``sum_i weights[i] dscale_i``."""
        return {"scale": weights.astype(dy.dtype) @ self._per_example_dscale(cache, dy)}


@dataclass(frozen=True)
class PositionalEmbedding(Layer):
    """y = x + W[:time]: a learned vector per position, added to ``x: (..., time, d_model)``.

    Args:
      max_length: the most positions (``W: (max_length, d_model)``).

    Cache: None; backward needs only dy: dx = dy, dW[:time] = dy summed over the
    leading axes, and rows past ``time`` get zero.
    """

    max_length: int
    stddev = 0.02  # initial W ~ N(0, stddev^2), as GPT-2's position table

    def __post_init__(self):
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            raise ValueError(f"PositionalEmbedding: max_length must be a positive int, got {self.max_length!r}")

    def _check_time(self, x) -> None:
        check_array(self, x, min_ndim=2)
        check_float(self, x)
        time = x.shape[-2]
        if time > self.max_length:
            raise ValueError(
                f"{describe(self)}: expected at most {self.max_length} positions, got x of shape {tuple(x.shape)} "
                f"(time {time} on axis -2); raise max_length or feed sequences of at most {self.max_length}"
            )

    def init(self, key, x):
        self._check_time(x)
        dtype = param_dtype(x)
        return {"W": self.stddev * jax.random.normal(key, (self.max_length, x.shape[-1]), dtype)}

    def forward(self, params, x, *, key=None):
        """``key`` is ignored (no randomness); provided for compatibility."""
        self._check_time(x)
        if x.shape[-1] != params["W"].shape[1] or params["W"].shape[0] != self.max_length:
            raise ValueError(
                f"{describe(self)}: expected x[..., time, {params['W'].shape[1]}] and W of shape "
                f"({self.max_length}, d_model), got x {tuple(x.shape)} and W {tuple(params['W'].shape)}"
            )
        return x + jax.lax.broadcast_to_rank(params["W"][: x.shape[-2]], x.ndim), None

    def apply(self, params, x, *, key=None):
        return self.forward(params, x)[0]

    def _pad(self, dW_rows: jax.Array) -> jax.Array:
        """``(time, d_model) -> (max_length, d_model)``: positions past ``time`` got no gradient."""
        return jnp.pad(dW_rows, ((0, self.max_length - dW_rows.shape[0]), (0, 0)))

    def backward(self, params, cache, dy):
        return {"W": self._pad(sum_leading(dy, 2))}, dy

    def _per_example_rows(self, dy):
        _check_batched(self, dy, 3)
        return dy.reshape(dy.shape[0], -1, *dy.shape[-2:]).sum(axis=1)  # (batch, time, d_model)

    def per_example_sq_norms(self, params, cache, dy):
        """``||dW_i||^2 = ||dy_i||^2`` (summed over any axes between batch and time first)."""
        rows = self._per_example_rows(dy).astype(jnp.promote_types(dy.dtype, jnp.float32))
        return jnp.sum(rows * rows, axis=(1, 2))

    def per_example_weighted_grads(self, params, cache, dy, weights):
        """``sum_i weights[i] dW_i``."""
        return {"W": self._pad(jnp.tensordot(weights.astype(dy.dtype), self._per_example_rows(dy), axes=1))}


@dataclass(frozen=True)
class TransformerBlock(Layer):
    """Pre-norm transformer block: x + MHA(RMSNorm(x)), then x + MLP(RMSNorm(x)).

    Args:
      num_heads: attention heads (d_model must divide by it).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * d_model``.
      causal: causal attention (a language model).

    MLP = Dense(mlp_ratio * d) -> GELU -> Dense(d). d_model is known only from x,
    so the layers live in ``block(d_model)``, a Sequential of two Residuals, and
    every method delegates to it (d_model from x at init, from params after).
    Params, cache and gradients are that Sequential's. Shapes: ``x: (..., time, d_model)``.
    """

    num_heads: int
    _: KW_ONLY
    mlp_ratio: int = 4
    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise ValueError(f"TransformerBlock: num_heads must be a positive int, got {self.num_heads!r}")
        if not isinstance(self.mlp_ratio, int) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio < 1:
            raise ValueError(f"TransformerBlock: mlp_ratio must be a positive int, got {self.mlp_ratio!r}")

    def block(self, d_model: int) -> Sequential:
        """The layers for width ``d_model``: ``Sequential([Residual(attention), Residual(mlp)])``."""
        attention = Sequential([RMSNorm(), MultiHeadAttention(self.num_heads, causal=self.causal)])
        mlp = Sequential([RMSNorm(), Dense(self.mlp_ratio * d_model), GELU(), Dense(d_model)])
        return Sequential([Residual(attention), Residual(mlp)])

    def _d_model(self, params) -> int:
        try:
            return params[0][0]["scale"].shape[0]
        except (TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(
                f"{describe(self)}: expected params from TransformerBlock.init (a list of two Residual blocks' "
                f"params), got {type(params).__name__}"
            ) from None

    def init(self, key, x):
        check_array(self, x, min_ndim=2)
        check_float(self, x)
        d_model = x.shape[-1]
        if d_model % self.num_heads:
            raise ValueError(
                f"{describe(self)}: d_model {d_model} (x[..., {d_model}]) does not divide by num_heads "
                f"{self.num_heads}; pick num_heads dividing {d_model}"
            )
        return self.block(d_model).init(key, x)

    def apply(self, params, x, *, key=None):
        return self.block(self._d_model(params)).apply(params, x, key=key)

    def forward(self, params, x, *, key=None):
        return self.block(self._d_model(params)).forward(params, x, key=key)

    def backward(self, params, cache, dy):
        return self.block(self._d_model(params)).backward(params, cache, dy)

    def children(self, params, x, *, key=None) -> list[Child]:
        """The inner Sequential's children: ``[0]`` the attention Residual, ``[1]`` the MLP Residual.

        The paths are the params' own (params are the Sequential's list), so the
        checker names e.g. ``[2][0].block[1]`` for the attention of model layer 2.
        """
        return self.block(self._d_model(params)).children(params, x, key=key)

    def per_example_backward(self, params, cache, dy):
        """The inner Sequential's ``(sq_norms, dx, weighted_grads)``."""
        return self.block(self._d_model(params)).per_example_backward(params, cache, dy)

    def per_example_sq_norms(self, params, cache, dy):
        return self.per_example_backward(params, cache, dy)[0]
