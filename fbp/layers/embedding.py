"""Embedding: a lookup table from integer ids to learned vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers.base import Layer, check_array, describe, is_concrete


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
        if is_concrete(x) and x.size:
            values = np.asarray(x)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(
                    f"{describe(self)}: ids must lie in [0, {self.num_embeddings}), got values in [{low}, {high}]"
                )

    def forward(self, params, ids, *, key=None):
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
