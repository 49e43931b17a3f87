"""Dense (fully connected) layer: y = x W + b."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fbp.layers.base import (
    Layer,
    check_array,
    check_float,
    describe,
    param_dtype,
    per_example_bias_grads,
    per_example_bias_sq_norms,
    per_example_outer,
    weighted_grads_from_input,
)
from fbp.layers.initializers import check_weight_init, init_weight


@dataclass(frozen=True)
class Dense(Layer):
    """y = x W + b on the last axis.

    Args:
      features: output width.
      use_bias: add ``b``.
      weight_init: ``"glorot"`` (uniform, default; good before tanh/sigmoid),
        ``"he"`` (normal, for ReLU nets) or ``"lecun"`` (normal).

    Shapes: ``x: (..., in_features)``, ``W: (in_features, features)``,
    ``b: (features,)``, ``y: (..., features)``. Cache: ``x``.
    """

    features: int
    use_bias: bool = True
    weight_init: str = "glorot"

    def __post_init__(self):
        if not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"Dense: features must be a positive int, got {self.features!r}")
        check_weight_init("Dense", self.weight_init)

    def init(self, key, x):
        check_array(self, x)
        dtype = param_dtype(x)
        W = init_weight(self.weight_init, key, (x.shape[-1], self.features), dtype)
        params = {"W": W}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params

    def _check(self, params, x):
        check_array(self, x)
        check_float(self, x)
        in_features = params["W"].shape[0]
        if x.shape[-1] != in_features:
            hint = "; did you forget Flatten()?" if x.ndim > 2 else ""
            raise ValueError(
                f"{describe(self)}: expected x[..., {in_features}], got shape {tuple(x.shape)}{hint}"
            )

    def apply(self, params, x, *, key=None):
        self._check(params, x)
        y = x @ params["W"]
        # broadcast_to_rank: b (features,) -> (1, ..., features), explicit under rank_promotion="raise"
        return y + jax.lax.broadcast_to_rank(params["b"], y.ndim) if self.use_bias else y

    def forward(self, params, x, *, key=None):
        return self.apply(params, x), x  # cache: x, since dW = x^T dy

    def backward(self, params, x, dy):
        # dW = x^T dy summed over every leading axis; db = sum dy; dx = dy W^T
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dparams = {"W": x2.T @ dy2}
        if self.use_bias:
            dparams["b"] = dy2.sum(axis=0)
        return dparams, dy @ params["W"].T

    def per_example_sq_norms(self, params, x, dy):
        """``||dW_i||^2 + ||db_i||^2`` for every example i of ``x: (batch, ..., in_features)``.

        dW_i = sum_t x_it^T dy_it over the example's positions t, so the norm
        comes from x and dy alone (a product of norms for one position); as
        ``per_example_backward`` computes it.
        """
        return self.per_example_backward(params, x, dy)[0]

    def per_example_backward(self, params, x, dy):
        """``(sq_norms, dx, weighted_grads)`` from one walk (``call_per_example_backward``).

        Over several positions, where the norm takes the matrix form, each
        example's dW_i is computed once, for its norm and for the weighted sum
        (``per_example_outer``).
        """
        batch = dy.shape[0]
        x3, dy3 = x.reshape(batch, -1, x.shape[-1]), dy.reshape(batch, -1, dy.shape[-1])
        sq, weighted_W = per_example_outer(x3, dy3)

        def weighted_grads(weights):
            dparams = {"W": weighted_W(weights)}
            if self.use_bias:
                dparams["b"] = weights.astype(dy.dtype) @ per_example_bias_grads(dy)
            return dparams

        return (sq + per_example_bias_sq_norms(dy) if self.use_bias else sq), dy @ params["W"].T, weighted_grads

    def per_example_weighted_grads(self, params, x, dy, weights):
        """sum_i weights[i] g_i for ``x: (batch, ..., in_features)``: dW = (weights x)^T dy, db = weights^T dy_i."""
        return weighted_grads_from_input(self, params, x, dy, weights)
