"""Pooling on NHWC images: MaxPool2D and AvgPool2D (VALID windows, no parameters).

Both accept ``(H, W, C)`` (one example, as vmap feeds it) or ``(..., H, W, C)``
with any number of leading axes. The window helpers are the convolutions'
(fbp/layers/windows.py): a strided slice per window offset, and its transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from fbp.layers.base import Layer, describe
from fbp.layers.windows import as_batch, freeze, place, spatial_ints, window_slice


class _Pool(Layer):
    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "window", freeze(self.window))
        object.__setattr__(self, "stride", freeze(self.stride))
        spatial_ints(self.window, 2, "window", name)
        if self.stride is not None:
            spatial_ints(self.stride, 2, "stride", name)

    @property
    def _window(self) -> tuple[int, ...]:
        return spatial_ints(self.window, 2, "window", type(self).__name__)

    @property
    def _stride(self) -> tuple[int, ...]:
        return self._window if self.stride is None else spatial_ints(self.stride, 2, "stride", type(self).__name__)

    def _images(self, x):
        """(..., H, W, C) -> ((N, H, W, C), leading shape), checking the image covers the window."""
        x4, lead = as_batch(self, x, 2)
        (kh, kw), hw = self._window, x4.shape[1:3]
        if hw[0] < kh or hw[1] < kw:
            raise ValueError(f"{describe(self)}: image {tuple(hw)} is smaller than the window {(kh, kw)}")
        return x4, lead

    def _reduce(self, x4, init, op):
        return lax.reduce_window(x4, init, op, (1, *self._window, 1), (1, *self._stride, 1), "VALID")


@dataclass(frozen=True)
class MaxPool2D(_Pool):
    """y = max over each window (VALID padding; stride defaults to the window).

    Shapes: ``x: (..., H, W, C)``, ``y: (..., Ho, Wo, C)``. Cache: (x, y).
    The gradient goes to the first maximum of each window in row-major order,
    the subgradient XLA's own max-pool gradient picks on ties.
    """

    window: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None

    def apply(self, params, x, *, key=None):
        """``key`` is ignored (no randomness)."""
        x4, lead = self._images(x)
        y = self._reduce(x4, -jnp.inf, lax.max)
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x, *, key=None):
        y = self.apply(params, x)
        return y, (x, y)  # cache: x and y, to find each window's maximum

    def backward(self, params, cache, dy):
        x, y = cache
        x4, _ = self._images(x)
        y4, dy4 = y.reshape(-1, *y.shape[-3:]), dy.reshape(-1, *dy.shape[-3:])
        out_hw, size = y4.shape[1:3], x4.shape[1:3]
        taken = jnp.zeros(y4.shape, bool)
        dx = jnp.zeros_like(x4)
        for i in range(self._window[0]):
            for j in range(self._window[1]):
                hit = (window_slice(x4, (i, j), self._stride, out_hw) == y4) & ~taken
                taken = taken | hit
                dx = dx + place(jnp.where(hit, dy4, 0), (i, j), self._stride, size)
        return {}, dx.reshape(x.shape)


@dataclass(frozen=True)
class AvgPool2D(_Pool):
    """y = mean over each window (VALID padding; stride defaults to the window).

    Shapes: ``x: (..., H, W, C)``, ``y: (..., Ho, Wo, C)``. Each input in a window
    gets dy / (kh kw). Cache: backward needs only the input's height and width,
    so the cache is a zero-size array of shape (0, H, W) that records them.
    """

    window: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None

    def apply(self, params, x, *, key=None):
        """``key`` is ignored (no randomness)."""
        x4, lead = self._images(x)
        y = self._reduce(x4, 0.0, lax.add) / (self._window[0] * self._window[1])
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x, *, key=None):
        return self.apply(params, x), jnp.zeros((0, *x.shape[-3:-1]), x.dtype)

    def backward(self, params, shape_record, dy):
        dy4 = dy.reshape(-1, *dy.shape[-3:]) / (self._window[0] * self._window[1])
        size = shape_record.shape[1:]
        dx = sum(
            place(dy4, (i, j), self._stride, size) for i in range(self._window[0]) for j in range(self._window[1])
        )
        return {}, dx.reshape(*dy.shape[:-3], *size, dy.shape[-1])
