"""2-D convolution and pooling on NHWC images (kernels HWIO).

Every layer here accepts ``(H, W, C)`` (one example, as vmap feeds it) or
``(..., H, W, C)`` with any number of leading axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from fbp.layers.base import (
    Layer,
    check_array,
    check_float,
    describe,
    param_dtype,
    per_example_outer_sq_norms,
    scale_examples,
)
from fbp.layers.dense import _INITIALIZERS

_DIMS = ("NHWC", "HWIO", "NHWC")


def _pair(v, what: str, owner: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(n, int) and n >= 1 for n in pair):
        raise ValueError(f"{owner}: {what} must be a positive int or a pair of them, got {v!r}")
    return pair


def _as_images(layer, x):
    """(..., H, W, C) -> ((N, H, W, C), leading shape)."""
    check_array(layer, x, min_ndim=3)
    check_float(layer, x)
    lead = x.shape[:-3]
    return x.reshape(-1, *x.shape[-3:]), lead


def _place(c, offset, stride, size):
    """Scatter c[:, a, b] to out[:, offset[0] + stride[0] a, offset[1] + stride[1] b] in an
    (N, *size, C) array of zeros: the transpose of one strided window slice, as a pad."""
    (i, j), (sh, sw), (ho, wo) = offset, stride, c.shape[1:3]
    config = [
        (0, 0, 0),
        (i, size[0] - i - sh * (ho - 1) - 1, sh - 1),
        (j, size[1] - j - sw * (wo - 1) - 1, sw - 1),
        (0, 0, 0),
    ]
    return lax.pad(c, jnp.zeros((), c.dtype), config)


def _window_slice(x, offset, stride, out_hw):
    (i, j), (sh, sw), (ho, wo) = offset, stride, out_hw
    return x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


@dataclass(frozen=True)
class Conv2D(Layer):
    """y = conv(x, W) + b: cross-correlation, NHWC input, HWIO kernel.

    Args:
      features: output channels.
      kernel_size: int or (kh, kw).
      stride: int or (sh, sw).
      padding: "SAME" or "VALID".

    Shapes: ``x: (..., H, W, C)``, ``W: (kh, kw, C, features)``, ``b: (features,)``,
    ``y: (..., Ho, Wo, features)``. Cache: x.

    Backward (the two transposes of the convolution, themselves convolutions):
    dx = conv(dy dilated by stride, W flipped in space with in/out swapped);
    dW[i, j] = sum over n, a, b of x_pad[n, i + s a, j + s b] dy[n, a, b] (a
    convolution of x with dy, the batch axis playing the channel).
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    padding: str = "SAME"
    use_bias: bool = True
    weight_init: str = "he"

    def __post_init__(self):
        owner = f"Conv2D({self.features})"
        if not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"Conv2D: features must be a positive int, got {self.features!r}")
        _pair(self.kernel_size, "kernel_size", owner)
        _pair(self.stride, "stride", owner)
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"{owner}: padding must be 'SAME' or 'VALID', got {self.padding!r}")
        if self.weight_init not in _INITIALIZERS:
            raise ValueError(f"{owner}: weight_init must be one of {sorted(_INITIALIZERS)}")

    @property
    def _kernel(self):
        return _pair(self.kernel_size, "kernel_size", "Conv2D")

    @property
    def _stride(self):
        return _pair(self.stride, "stride", "Conv2D")

    def init(self, key, x):
        check_array(self, x, min_ndim=3)
        dtype = param_dtype(x)
        shape = (*self._kernel, x.shape[-1], self.features)
        params = {"W": _INITIALIZERS[self.weight_init]()(key, shape, dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params

    def _pads(self, hw):
        return lax.padtype_to_pads(hw, self._kernel, self._stride, self.padding)

    def apply(self, params, x):
        x4, lead = _as_images(self, x)
        W = params["W"]
        if x4.shape[-1] != W.shape[2]:
            raise ValueError(
                f"{describe(self)}: expected x[..., H, W, {W.shape[2]}] (NHWC), got shape {tuple(x.shape)}"
            )
        pads = self._pads(x4.shape[1:3])
        if any(x4.shape[1 + a] + sum(pads[a]) < self._kernel[a] for a in range(2)):
            raise ValueError(
                f"{describe(self)}: image {x4.shape[1:3]} is smaller than the kernel {self._kernel}"
            )
        y = lax.conv_general_dilated(x4, W, self._stride, pads, dimension_numbers=_DIMS)
        if self.use_bias:
            y = y + lax.broadcast_to_rank(params["b"], y.ndim)
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x):
        return self.apply(params, x), x  # cache: x, for dW

    def backward(self, params, x, dy):
        x4, _ = _as_images(self, x)
        dy4 = dy.reshape(-1, *dy.shape[-3:])
        (kh, kw), (sh, sw) = self._kernel, self._stride
        h, w = x4.shape[1:3]
        (lo_h, hi_h), (lo_w, hi_w) = self._pads((h, w))
        # rows of the padded input that no window reaches (stride leftovers)
        rest_h = (h + lo_h + hi_h - kh) % sh
        rest_w = (w + lo_w + hi_w - kw) % sw
        W_flipped = jnp.swapaxes(params["W"][::-1, ::-1], 2, 3)
        dx = lax.conv_general_dilated(
            dy4,
            W_flipped,
            (1, 1),
            [(kh - 1 - lo_h, kh - 1 - hi_h + rest_h), (kw - 1 - lo_w, kw - 1 - hi_w + rest_w)],
            lhs_dilation=(sh, sw),
            dimension_numbers=_DIMS,
        )
        # batch axis n is the contracted "channel"; input channel c is the "batch"
        dW = lax.conv_general_dilated(
            x4,
            dy4,
            (1, 1),
            [(lo_h, hi_h - rest_h), (lo_w, hi_w - rest_w)],
            rhs_dilation=(sh, sw),
            dimension_numbers=("CHWN", "IHWO", "HWNC"),
        )
        dparams = {"W": dW}
        if self.use_bias:
            dparams["b"] = dy4.sum(axis=(0, 1, 2))
        return dparams, dx.reshape(x.shape)

    def per_example_sq_norms(self, params, x, dy):
        """``||dW_i||^2 + ||db_i||^2`` for every example i of ``x: (batch, ..., H, W, C)``.

        dW_i[a, b] = sum_p x_i[p + (a, b)]^T dy_i[p] over output pixels p: for
        each kernel offset (a, b) a Dense-like sum of outer products of the
        shifted input window and dy, and ||dW_i||^2 adds over the offsets. One
        strided slice per offset; no image patches (kh kw times the input) and
        no per-example kernels are formed unless that is the cheaper form.
        """
        batch = dy.shape[0]
        x4, _ = _as_images(self, x)
        x_padded = jnp.pad(x4, ((0, 0), *self._pads(x4.shape[1:3]), (0, 0)))
        dy3 = dy.reshape(batch, -1, dy.shape[-1])
        sq = sum(
            per_example_outer_sq_norms(
                _window_slice(x_padded, (i, j), self._stride, dy.shape[-3:-1]).reshape(batch, -1, x4.shape[-1]), dy3
            )
            for i in range(self._kernel[0])
            for j in range(self._kernel[1])
        )
        if self.use_bias:
            db = dy3.sum(axis=1).astype(sq.dtype)
            sq = sq + jnp.sum(db * db, axis=1)
        return sq

    def per_example_weighted_grads(self, params, x, dy, weights):
        """sum_i weights[i] g_i for ``x: (batch, ..., H, W, C)``: dW from weights x and dy, db = weights^T dy.

        As Dense: weighing x keeps dy as the plain backward has it (a weighted
        dy feeding the dW convolution made XLA on CPU split the pooling
        backward that produces dy, four times slower).
        """
        dparams, _ = self.backward(params, scale_examples(x, weights), dy)
        if self.use_bias:
            dparams["b"] = weights.astype(dy.dtype) @ dy.reshape(dy.shape[0], -1, dy.shape[-1]).sum(axis=1)
        return dparams


class _Pool(Layer):
    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None

    def __post_init__(self):
        _pair(self.window, "window", type(self).__name__)
        if self.stride is not None:
            _pair(self.stride, "stride", type(self).__name__)

    @property
    def _window(self):
        return _pair(self.window, "window", type(self).__name__)

    @property
    def _stride(self):
        return self._window if self.stride is None else _pair(self.stride, "stride", "")

    def _out_hw(self, hw):
        (kh, kw), (sh, sw) = self._window, self._stride
        if hw[0] < kh or hw[1] < kw:
            raise ValueError(f"{describe(self)}: image {tuple(hw)} is smaller than the window {(kh, kw)}")
        return (hw[0] - kh) // sh + 1, (hw[1] - kw) // sw + 1

    def _reduce(self, x4, init, op):
        self._out_hw(x4.shape[1:3])
        return lax.reduce_window(
            x4, init, op, (1, *self._window, 1), (1, *self._stride, 1), "VALID"
        )


@dataclass(frozen=True)
class MaxPool2D(_Pool):
    """y = max over each window (VALID padding; stride defaults to the window).

    Shapes: ``x: (..., H, W, C)``, ``y: (..., Ho, Wo, C)``. Cache: (x, y).
    The gradient goes to the first maximum of each window in row-major order,
    the subgradient XLA's own max-pool gradient picks on ties.
    """

    window: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None

    def apply(self, params, x):
        x4, lead = _as_images(self, x)
        y = self._reduce(x4, -jnp.inf, lax.max)
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x):
        y = self.apply(params, x)
        return y, (x, y)

    def backward(self, params, cache, dy):
        x, y = cache
        x4, _ = _as_images(self, x)
        y4, dy4 = y.reshape(-1, *y.shape[-3:]), dy.reshape(-1, *dy.shape[-3:])
        out_hw, size = y4.shape[1:3], x4.shape[1:3]
        taken = jnp.zeros(y4.shape, bool)
        dx = jnp.zeros_like(x4)
        for i in range(self._window[0]):
            for j in range(self._window[1]):
                hit = (_window_slice(x4, (i, j), self._stride, out_hw) == y4) & ~taken
                taken = taken | hit
                dx = dx + _place(jnp.where(hit, dy4, 0), (i, j), self._stride, size)
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

    def apply(self, params, x):
        x4, lead = _as_images(self, x)
        y = self._reduce(x4, 0.0, lax.add) / (self._window[0] * self._window[1])
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x):
        return self.apply(params, x), jnp.zeros((0, *x.shape[-3:-1]), x.dtype)

    def backward(self, params, shape_record, dy):
        dy4 = dy.reshape(-1, *dy.shape[-3:]) / (self._window[0] * self._window[1])
        size = shape_record.shape[1:]
        dx = sum(
            _place(dy4, (i, j), self._stride, size)
            for i in range(self._window[0])
            for j in range(self._window[1])
        )
        return {}, dx.reshape(*dy.shape[:-3], *size, dy.shape[-1])
