"""Layers made of layers: Sequential (the chain rule) and Residual (gradients add).

Each says what it is made of through ``children`` (see ``LayerProtocol``), the
one method the checker's first-wrong-layer search uses to descend into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fbp.layers.base import Child, Layer, call_per_example_backward, describe, missing_methods, split_key


def _check_protocol(layer, where):
    missing = missing_methods(layer)
    if missing:
        raise TypeError(f"{where}: {type(layer).__name__} is not a layer: it lacks {', '.join(missing)}")


@dataclass(frozen=True)
class Sequential(Layer):
    """y = f_n(... f_2(f_1(x))). Params: a list, one entry per layer. Cache: a list of caches.

    A key is split into one key per layer. Backward walks the layers in
    reverse, feeding each one's dx to the layer before it as dy: the chain rule.
    """

    layers: tuple[Any, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, layer in enumerate(self.layers):
            _check_protocol(layer, f"Sequential layer [{i}]")

    def init(self, key, x):
        params = []
        for layer, k in zip(self.layers, split_key(key, len(self.layers))):
            p = layer.init(k, x)
            x = jax.eval_shape(lambda p, x, layer=layer: layer.apply(p, x), p, x)
            params.append(p)
        return params

    def _check_params(self, params):
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(f"{describe(self)}: expected params as a list of {len(self.layers)}, got {got}")

    def children(self, params, x, *, key=None) -> list[Child]:
        """Layer i as ``Child(f"[{i}]", layers[i], params[i], its input, its key)``: the chain, run with apply."""
        self._check_params(params)
        children = []
        for i, (layer, p, k) in enumerate(zip(self.layers, params, split_key(key, len(self.layers)))):
            if children:
                before = children[-1]
                x = before.layer.apply(before.params, before.x, key=before.key)
            children.append(Child(f"[{i}]", layer, p, x, k))
        return children

    def apply(self, params, x, *, key=None):
        children = self.children(params, x, key=key)
        if not children:
            return x
        last = children[-1]
        return last.layer.apply(last.params, last.x, key=last.key)

    def forward(self, params, x, *, key=None):
        self._check_params(params)
        caches = []
        for layer, p, k in zip(self.layers, params, split_key(key, len(self.layers))):
            x, cache = layer.forward(p, x, key=k)
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
        """``(sq_norms, dx, weighted_grads)`` (see ``LayerProtocol``): the layers' norms add.

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
    """y = x + block(x). Params: the block's. Cache: the block's. The key goes to the block.

    x reaches y along two paths, so dx = dy + dx_block: the gradients add.
    """

    block: Any

    def __post_init__(self):
        _check_protocol(self.block, "Residual")

    def init(self, key, x):
        params = self.block.init(key, x)
        out = jax.eval_shape(lambda p, x: self.block.apply(p, x), params, x)
        self._check_shapes(x, out)
        return params

    def _check_shapes(self, x, out):
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"{describe(self)}: the block must keep the shape, got x {tuple(x.shape)} -> {tuple(out.shape)}"
            )

    def children(self, params, x, *, key=None) -> list[Child]:
        """The block, as ``Child(".block", block, params, x, key)``: it sees the residual's own input."""
        return [Child(".block", self.block, params, x, key)]

    def apply(self, params, x, *, key=None):
        out = self.block.apply(params, x, key=key)
        self._check_shapes(x, out)
        return x + out

    def forward(self, params, x, *, key=None):
        out, cache = self.block.forward(params, x, key=key)
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
