"""Elementwise activations and the softmax pair. Any shape; no parameters; key= is accepted and ignored."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fbp.layers.base import Layer, check_array, check_float


class _Activation(Layer):
    def _check(self, x):
        check_array(self, x, min_ndim=0)
        check_float(self, x)


@dataclass(frozen=True)
class ReLU(_Activation):
    """y = max(x, 0). Subgradient 0 at x == 0 (as jax.nn.relu). Cache: the mask x > 0."""

    def apply(self, params, x, *, key=None):
        self._check(x)
        return jnp.where(x > 0, x, jnp.zeros_like(x))

    def forward(self, params, x, *, key=None):
        mask = x > 0
        return self.apply(params, x), mask  # a bool mask is all dy needs

    def backward(self, params, mask, dy):
        return {}, jnp.where(mask, dy, jnp.zeros_like(dy))


@dataclass(frozen=True)
class LeakyReLU(_Activation):
    """y = x if x > 0 else negative_slope * x. Cache: the mask x > 0."""

    negative_slope: float = 0.01

    def __post_init__(self):
        value = self.negative_slope
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"LeakyReLU: negative_slope must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"LeakyReLU: negative_slope must be finite, got {value!r}")

    def apply(self, params, x, *, key=None):
        self._check(x)
        return jnp.where(x > 0, x, self.negative_slope * x)

    def forward(self, params, x, *, key=None):
        return self.apply(params, x), x > 0

    def backward(self, params, mask, dy):
        return {}, jnp.where(mask, dy, self.negative_slope * dy)


@dataclass(frozen=True)
class Sigmoid(_Activation):
    """y = 1 / (1 + exp(-x)). Cache: y, since dy/dx = y (1 - y)."""

    def apply(self, params, x, *, key=None):
        self._check(x)
        return jax.nn.sigmoid(x)

    def forward(self, params, x, *, key=None):
        y = self.apply(params, x)
        return y, y

    def backward(self, params, y, dy):
        return {}, dy * y * (1 - y)


@dataclass(frozen=True)
class Tanh(_Activation):
    """y = tanh(x). Cache: y, since dy/dx = 1 - y**2."""

    def apply(self, params, x, *, key=None):
        self._check(x)
        return jnp.tanh(x)

    def forward(self, params, x, *, key=None):
        y = self.apply(params, x)
        return y, y

    def backward(self, params, y, dy):
        return {}, dy * (1 - y * y)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class GELU(_Activation):
    """The tanh approximation of GELU (Hendrycks & Gimpel 2016), as jax.nn.gelu(approximate=True):

    y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Cache: (x, tanh(u)); dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """

    def forward(self, params, x, *, key=None):
        self._check(x)
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), (x, t)

    def backward(self, params, cache, dy):
        x, t = cache
        du_dx = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return {}, dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)


@dataclass(frozen=True)
class Softmax(_Activation):
    """y = exp(x) / sum(exp(x)) over the last axis. Cache: y.

    Jacobian diag(y) - y y^T gives dx = y * (dy - sum(dy * y)).
    """

    def apply(self, params, x, *, key=None):
        self._check(x)
        check_array(self, x, min_ndim=1)
        return jax.nn.softmax(x, axis=-1)

    def forward(self, params, x, *, key=None):
        y = self.apply(params, x)
        return y, y

    def backward(self, params, y, dy):
        return {}, y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True))


@dataclass(frozen=True)
class LogSoftmax(_Activation):
    """y = x - logsumexp(x) over the last axis. Cache: y.

    dy_i/dx_j = delta_ij - softmax_j, so dx = dy - exp(y) * sum(dy).
    """

    def apply(self, params, x, *, key=None):
        self._check(x)
        check_array(self, x, min_ndim=1)
        return jax.nn.log_softmax(x, axis=-1)

    def forward(self, params, x, *, key=None):
        y = self.apply(params, x)
        return y, y

    def backward(self, params, y, dy):
        return {}, dy - jnp.exp(y) * jnp.sum(dy, axis=-1, keepdims=True)
