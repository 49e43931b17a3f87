"""Layers made of layers: Sequential (the chain rule) and Residual (gradients add)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fbp.layers.base import Layer, call_apply, call_forward, call_per_example_backward, describe


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _check_protocol(layer, where):
    missing = [m for m in ("init", "apply", "forward", "backward") if not callable(getattr(layer, m, None))]
    if missing:
        raise TypeError(f"{where}: {type(layer).__name__} is not a layer: it lacks {', '.join(missing)}")


@dataclass(frozen=True)
class Sequential(Layer):
    """y = f_n(... f_2(f_1(x))). Params: a list, one entry per layer. Cache: a list of caches.

    Backward walks the layers in reverse, feeding each one's dx to the layer
    before it as dy: the chain rule.
    """

    layers: tuple[Any, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, layer in enumerate(self.layers):
            _check_protocol(layer, f"Sequential layer [{i}]")

    @property
    def takes_key(self):
        return any(getattr(layer, "takes_key", False) for layer in self.layers)

    def init(self, key, x):
        params = []
        for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            p = layer.init(k, x)
            x = jax.eval_shape(lambda p, x, layer=layer: call_apply(layer, p, x, None), p, x)
            params.append(p)
        return params

    def _check_params(self, params):
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(f"{describe(self)}: expected params as a list of {len(self.layers)}, got {got}")

    def apply(self, params, x, *, key=None):
        self._check_params(params)
        for layer, p, k in zip(self.layers, params, _split(key, len(self.layers))):
            x = call_apply(layer, p, x, k)
        return x

    def forward(self, params, x, *, key=None):
        self._check_params(params)
        caches = []
        for layer, p, k in zip(self.layers, params, _split(key, len(self.layers))):
            x, cache = call_forward(layer, p, x, k)
            caches.append(cache)
        return x, caches

    def backward(self, params, caches, dy):
        dparams = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            if dy is None:
                raise ValueError(
                    f"{describe(self)}: layer [{i + 1}] returned dx = None (a discrete input such as "
                    "Embedding's) but it is not the first layer"
                )
            dparams[i], dy = self.layers[i].backward(params[i], caches[i], dy)
        return dparams, dy

    def per_example_backward(self, params, caches, dy):
        """``(sq_norms, dx, weighted_grads)`` (see ``call_per_example_backward``): the layers' norms add.

        Walks back like ``backward``; ``weighted_grads(weights)`` gives every
        layer's weighted gradient from the dy that layer saw on this walk.
        """
        total = jnp.zeros((dy.shape[0],), jnp.promote_types(dy.dtype, jnp.float32))
        weighted = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            if dy is None:
                raise ValueError(f"{describe(self)}: layer [{i + 1}] returned dx = None but it is not the first layer")
            sq, dy, weighted[i] = call_per_example_backward(self.layers[i], params[i], caches[i], dy)
            total = total + sq
        return total, dy, lambda weights: [grads(weights) for grads in weighted]

    def per_example_sq_norms(self, params, caches, dy):
        """Squared norm of each example's whole gradient, ``(batch,)``."""
        return self.per_example_backward(params, caches, dy)[0]


@dataclass(frozen=True)
class Residual(Layer):
    """y = x + block(x). Params: the block's. Cache: the block's.

    x reaches y along two paths, so dx = dy + dx_block: the gradients add.
    """

    block: Any

    def __post_init__(self):
        _check_protocol(self.block, "Residual")

    @property
    def takes_key(self):
        return getattr(self.block, "takes_key", False)

    def init(self, key, x):
        params = self.block.init(key, x)
        out = jax.eval_shape(lambda p, x: call_apply(self.block, p, x, None), params, x)
        self._check_shapes(x, out)
        return params

    def _check_shapes(self, x, out):
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"{describe(self)}: the block must keep the shape, got x {tuple(x.shape)} -> {tuple(out.shape)}"
            )

    def apply(self, params, x, *, key=None):
        out = call_apply(self.block, params, x, key)
        self._check_shapes(x, out)
        return x + out

    def forward(self, params, x, *, key=None):
        out, cache = call_forward(self.block, params, x, key)
        self._check_shapes(x, out)
        return x + out, cache

    def backward(self, params, cache, dy):
        dparams, dx_block = self.block.backward(params, cache, dy)
        return dparams, dy + dx_block

    def per_example_backward(self, params, cache, dy):
        """The block's norms and weighted gradients (the skip path has no parameters); dx adds dy."""
        sq, dx_block, weighted_grads = call_per_example_backward(self.block, params, cache, dy)
        return sq, dy + dx_block, weighted_grads

    def per_example_sq_norms(self, params, cache, dy):
        """The block's: the skip path has no parameters."""
        return self.per_example_backward(params, cache, dy)[0]
