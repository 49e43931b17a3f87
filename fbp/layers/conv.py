"""Convolution on channels-last signals: Conv1D (NWC) and Conv2D (NHWC), one implementation.

Both are ``_Conv`` with one or two spatial axes; the private window helpers
here (``window_slice``, ``place``) work on any number of spatial axes and are
shared with the pools (fbp/layers/pool.py). Every layer accepts one example
(``(L, C)`` or ``(H, W, C)``, as vmap feeds it) or any number of leading axes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
from jax import lax

from fbp.layers.base import (
    Layer,
    check_array,
    describe,
    param_dtype,
    per_example_bias_grads,
    per_example_bias_sq_norms,
    weighted_grads_from_input,
)
from fbp.layers.initializers import check_weight_init, init_weight
from fbp.layers.windows import as_batch, freeze, is_count, spatial_ints, window_slice

# (input, kernel, output) layouts of lax.conv_general_dilated, by number of spatial axes
_LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}
# dW as a convolution of x with dy: the batch axis n is the contracted "channel", input channel c the "batch"
_KERNEL_GRAD_LAYOUTS = {1: ("CWN", "IWO", "WNC"), 2: ("CHWN", "IHWO", "HWNC")}
_AXIS_NAMES = {1: ("L",), 2: ("H", "W")}
_SIGNAL = {1: "sequence", 2: "image"}


def _explicit_pads(padding, n: int, owner: str) -> tuple[tuple[int, int], ...] | None:
    """None for "SAME"/"VALID"; else ``n`` (low, high) pairs.

    Accepted: an int p (p on both sides of every spatial axis, PyTorch's
    ``padding=p``); one entry per spatial axis, each an int or a (low, high)
    pair; for one spatial axis also a bare (low, high) pair.
    """
    if isinstance(padding, str):
        if padding in ("SAME", "VALID"):
            return None
        raise ValueError(
            f"{owner}: padding must be 'SAME' or 'VALID', got {padding!r}; "
            "or an int, or one int or (low, high) pair per spatial axis"
        )
    if is_count(padding):
        return ((padding, padding),) * n
    entries = tuple(padding) if isinstance(padding, (tuple, list)) else ()
    if n == 1 and len(entries) == 2 and all(is_count(e) for e in entries):
        entries = (entries,)  # Conv1D: one (low, high) pair
    pairs = []
    for entry in entries:
        if is_count(entry):
            pairs.append((entry, entry))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and all(is_count(e) for e in entry):
            pairs.append(tuple(entry))
    if len(entries) != n or len(pairs) != n:
        axes = ", ".join(_AXIS_NAMES[n])
        raise ValueError(
            f"{owner}: padding must be 'SAME', 'VALID', an int >= 0 or one int or (low, high) pair per "
            f"spatial axis ({axes}), got {padding!r}"
        )
    return tuple(pairs)


@dataclass(frozen=True)
class _Conv(Layer):
    """y = conv(x, W) + b with ``_spatial`` spatial axes, channels last. See Conv1D and Conv2D.

    Backward (the two transposes of the convolution, themselves convolutions):
    dx = conv(dy dilated by the stride, W flipped in space with in/out swapped);
    dW[k] = sum over n and output positions a of x_pad[n, k + s a] dy[n, a] (a
    convolution of x with dy, the batch axis playing the channel).
    """

    features: int
    kernel_size: Any = 3
    stride: Any = 1
    padding: Any = "SAME"
    use_bias: bool = True
    weight_init: str = "he"

    _spatial: ClassVar[int]

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.features, int) or isinstance(self.features, bool) or self.features < 1:
            raise ValueError(f"{name}: features must be a positive int, got {self.features!r}")
        for field in ("kernel_size", "stride", "padding"):
            object.__setattr__(self, field, freeze(getattr(self, field)))
        owner = f"{name}({self.features})"
        spatial_ints(self.kernel_size, self._spatial, "kernel_size", owner)
        spatial_ints(self.stride, self._spatial, "stride", owner)
        _explicit_pads(self.padding, self._spatial, owner)
        check_weight_init(owner, self.weight_init)

    @property
    def _kernel(self) -> tuple[int, ...]:
        return spatial_ints(self.kernel_size, self._spatial, "kernel_size", type(self).__name__)

    @property
    def _stride(self) -> tuple[int, ...]:
        return spatial_ints(self.stride, self._spatial, "stride", type(self).__name__)

    def _pads(self, spatial_shape) -> list[tuple[int, int]]:
        explicit = _explicit_pads(self.padding, self._spatial, describe(self))
        if explicit is not None:
            return list(explicit)
        return lax.padtype_to_pads(spatial_shape, self._kernel, self._stride, self.padding)

    def init(self, key, x):
        check_array(self, x, min_ndim=self._spatial + 1)
        dtype = param_dtype(x)
        params = {"W": init_weight(self.weight_init, key, (*self._kernel, x.shape[-1], self.features), dtype)}
        if self.use_bias:
            params["b"] = jnp.zeros((self.features,), dtype)
        return params

    def _as_batch(self, params, x):
        xs, lead = as_batch(self, x, self._spatial)
        n, in_channels = self._spatial, params["W"].shape[-2]
        if xs.shape[-1] != in_channels:
            axes = ", ".join(_AXIS_NAMES[n])
            raise ValueError(
                f"{describe(self)}: expected x[..., {axes}, {in_channels}] ({_LAYOUTS[n][0]}), "
                f"got shape {tuple(x.shape)}"
            )
        pads = self._pads(xs.shape[1:-1])
        if any(xs.shape[1 + a] + sum(pads[a]) < self._kernel[a] for a in range(n)):
            raise ValueError(
                f"{describe(self)}: {_SIGNAL[n]} {tuple(xs.shape[1:-1])} is smaller than the kernel {self._kernel}"
                " (with its padding); pad more or use a smaller kernel_size"
            )
        return xs, lead, pads

    def apply(self, params, x, *, key=None):
        """``x: (..., *spatial, C)`` -> ``y: (..., *spatial_out, features)``; ``key`` is ignored."""
        del key
        xs, lead, pads = self._as_batch(params, x)
        y = lax.conv_general_dilated(xs, params["W"], self._stride, pads, dimension_numbers=_LAYOUTS[self._spatial])
        if self.use_bias:
            y = y + lax.broadcast_to_rank(params["b"], y.ndim)
        return y.reshape(*lead, *y.shape[1:])

    def forward(self, params, x, *, key=None):
        return self.apply(params, x), x  # cache: x, for dW

    def backward(self, params, x, dy):
        n = self._spatial
        xs, _, pads = self._as_batch(params, x)
        dys = dy.reshape(-1, *dy.shape[dy.ndim - n - 1 :])
        kernel, stride = self._kernel, self._stride
        # positions of the padded input that no window reaches (stride leftovers)
        rest = [(size + lo + hi - k) % s for size, (lo, hi), k, s in zip(xs.shape[1:-1], pads, kernel, stride)]
        W_flipped = jnp.swapaxes(jnp.flip(params["W"], axis=tuple(range(n))), n, n + 1)
        dx = lax.conv_general_dilated(
            dys,
            W_flipped,
            (1,) * n,
            [(k - 1 - lo, k - 1 - hi + r) for k, (lo, hi), r in zip(kernel, pads, rest)],
            lhs_dilation=stride,
            dimension_numbers=_LAYOUTS[n],
        )
        dW = lax.conv_general_dilated(
            xs,
            dys,
            (1,) * n,
            [(lo, hi - r) for (lo, hi), r in zip(pads, rest)],
            rhs_dilation=stride,
            dimension_numbers=_KERNEL_GRAD_LAYOUTS[n],
        )
        dparams = {"W": dW}
        if self.use_bias:
            dparams["b"] = dys.sum(axis=tuple(range(n + 1)))
        return dparams, dx.reshape(x.shape)

    def _windows(self, params, x, dy) -> list:
        """Each kernel offset k's input window x_pad[p + k] over the output positions p, per example.

        Returns ``prod(kernel)`` arrays ``(batch, T, C)`` in the order of ``W``'s kernel axes, with T every
        output position of an example (its extra leading axes too): example i's kernel gradient at offset k
        is ``windows[k][i]^T dy_i``. One strided slice each; no patches are formed.
        """
        batch, n = dy.shape[0], self._spatial
        xs, _, pads = self._as_batch(params, x)
        x_padded = jnp.pad(xs, ((0, 0), *pads, (0, 0)))
        out_shape = dy.shape[dy.ndim - n - 1 : -1]
        return [
            window_slice(x_padded, offset, self._stride, out_shape).reshape(batch, -1, xs.shape[-1])
            for offset in itertools.product(*(range(k) for k in self._kernel))
        ]

    def _gram_form_is_smaller(self, params, dy) -> bool:
        """Which per-example norm ``per_example_backward`` takes for ``dy: (batch, ..., *spatial_out, features)``.

        The mixed rule of Bu et al. 2022 ("mixed ghost clipping"), by the memory each form holds per example:
        the Gram form needs T x T (T output positions), the per-example gradient p x d (p = prod(kernel) * C,
        d = features); the Gram form when 2 T^2 <= p d. (In FLOPs the per-example gradient costs T p d
        against T^2 (p + d) for the Gram form, plus, for the Gram form only, the weighted gradient's own
        convolution: the per-example gradient is the cheaper form at every size, and memory decides.)
        """
        positions = math.prod(dy.shape[1:-1])
        return 2 * positions * positions <= math.prod(params["W"].shape)

    def per_example_backward(self, params, x, dy):
        """``(sq_norms, dx, weighted_grads)`` for ``x: (batch, ..., *spatial, C)`` (see ``call_per_example_backward``).

        dW_i[k] = sum_p x_i[p + k]^T dy_i[p] over output positions p (one outer-product sum per kernel offset
        k). By ``_gram_form_is_smaller``, either

        - per-example gradients: every dW_i (batch, *kernel, C, features) from one batched product per
          offset (with few input channels, one product over the patches); ||dW_i||^2 sums their squares,
          and ``weighted_grads(w)`` = sum_i w_i dW_i reuses them, so the clipped step forms no kernel
          gradient by convolution (its FLOPs are those of the batch step); or
        - the Gram form (ghost norm, Li et al. 2021): ||dW_i||^2 = sum_{p,q} (sum_k x_i[p+k] . x_i[q+k])
          (dy_i[p] . dy_i[q]), the input Gram summed over offsets (no patches), and ``weighted_grads(w)``
          the backward convolution on the weighted input.

        The bias adds ||sum_p dy_i[p]||^2. dx is ``backward``'s (under jit XLA drops its unused dW).
        """
        batch, features = dy.shape[0], dy.shape[-1]
        dx = self.backward(params, x, dy)[1]
        dtype = jnp.promote_types(jnp.result_type(x, dy), jnp.float32)  # norms in at least float32
        dy3 = dy.reshape(batch, -1, features)
        windows = self._windows(params, x, dy)
        bias_sq = per_example_bias_sq_norms(dy) if self.use_bias else 0.0
        if self._gram_form_is_smaller(params, dy):
            gram_x = sum(jnp.einsum("bti,bsi->bts", a, a, preferred_element_type=dtype) for a in windows)
            gram_dy = jnp.einsum("bto,bso->bts", dy3, dy3, preferred_element_type=dtype)
            sq_norms = jnp.sum(gram_x * gram_dy, axis=(1, 2)) + bias_sq
            return sq_norms, dx, lambda weights: weighted_grads_from_input(self, params, x, dy, weights)
        kernel_size, channels = len(windows), windows[0].shape[-1]
        if 2 * kernel_size * channels < (kernel_size - 1) * features:
            # few input channels: one product over all windows (patches, kernel_size C x T per example) reads
            # dy once, where one product per offset reads it kernel_size times; channels-first, so that each
            # window is a block of T contiguous values and the product a plain batched matmul
            patches = jnp.concatenate([jnp.swapaxes(a, 1, 2) for a in windows], axis=1)
            grads = jnp.einsum("bit,bto->bio", patches, dy3, preferred_element_type=dtype)
        else:
            grads = jnp.stack([jnp.einsum("bti,bto->bio", a, dy3, preferred_element_type=dtype) for a in windows], 1)
        grads = grads.reshape(batch, -1)  # example i's dW, flattened as W is
        sq_norms = jnp.sum(jnp.square(grads), axis=1) + bias_sq

        def weighted_grads(weights):
            dW = jnp.tensordot(weights.astype(dtype), grads, axes=1)
            dparams = {"W": dW.reshape(params["W"].shape).astype(jnp.result_type(x, dy))}
            if self.use_bias:
                dparams["b"] = weights.astype(dy.dtype) @ per_example_bias_grads(dy)
            return dparams

        return sq_norms, dx, weighted_grads

    def per_example_sq_norms(self, params, x, dy):
        """``||dW_i||^2 + ||db_i||^2`` for every example i of ``x: (batch, ..., *spatial, C)``: ``(batch,)``.

        As ``per_example_backward`` computes them (the Gram form or the per-example gradients).
        """
        return self.per_example_backward(params, x, dy)[0]

    def per_example_weighted_grads(self, params, x, dy, weights):
        """sum_i weights[i] g_i for ``x: (batch, ..., *spatial, C)``: dW from weights x and dy, db = weights^T db_i.

        One backward convolution on the weighted input; ``per_example_backward`` instead reuses the
        per-example gradients when it has formed them.
        """
        return weighted_grads_from_input(self, params, x, dy, weights)


@dataclass(frozen=True)
class Conv1D(_Conv):
    """y = conv(x, W) + b along one axis: cross-correlation, NWC input, WIO kernel.

    Args:
      features: output channels.
      kernel_size: int.
      stride: int.
      padding: "SAME" (output ceil(L / stride), the odd pad after), "VALID"
        (no padding), an int p (p zeros at each end, PyTorch's ``padding=p``),
        or a (low, high) pair.
      use_bias: add ``b``.
      weight_init: ``"he"`` (default), ``"glorot"`` or ``"lecun"``.

    Shapes: ``x: (..., L, C)``, ``W: (k, C, features)``, ``b: (features,)``,
    ``y: (..., Lo, features)`` with Lo = (L + low + high - k) // stride + 1.
    Cache: x. Backward as Conv2D's (one implementation, ``_Conv``).
    """

    _spatial: ClassVar[int] = 1


@dataclass(frozen=True)
class Conv2D(_Conv):
    """y = conv(x, W) + b: cross-correlation, NHWC input, HWIO kernel.

    Args:
      features: output channels.
      kernel_size: int or (kh, kw).
      stride: int or (sh, sw).
      padding: "SAME", "VALID", an int p (p on every side, PyTorch's
        ``padding=p``), or per spatial axis an int or a (low, high) pair, e.g.
        ``(1, (0, 2))``.
      use_bias: add ``b``.
      weight_init: ``"he"`` (default), ``"glorot"`` or ``"lecun"``.

    Shapes: ``x: (..., H, W, C)``, ``W: (kh, kw, C, features)``, ``b: (features,)``,
    ``y: (..., Ho, Wo, features)``. Cache: x.

    Backward (the two transposes of the convolution, themselves convolutions):
    dx = conv(dy dilated by stride, W flipped in space with in/out swapped);
    dW[i, j] = sum over n, a, b of x_pad[n, i + s a, j + s b] dy[n, a, b] (a
    convolution of x with dy, the batch axis playing the channel).
    """

    _spatial: ClassVar[int] = 2
