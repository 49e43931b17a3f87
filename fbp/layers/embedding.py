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

    Ids outside ``[0, num_embeddings)`` raise ValueError where their values are
    known (eager calls; ``fbp.data`` and ``fbp train`` check data as it enters).
    Under jit they cannot raise: there an out-of-range id (a negative one too,
    which NumPy indexing would wrap to the last rows) looks up a row of NaN and
    its gradient is dropped, so the loss is NaN and the train step's non-finite
    guard skips the update (``metrics["finite"]`` is False; ``fbp train``
    stops or counts it): never a silent update of another row.
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("num_embeddings", "features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Embedding: {name} must be a positive int, got {value!r}")

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

    def _in_range(self, ids):
        """Negative ids moved out of range too (to num_embeddings), so that none wraps around to the end."""
        return jnp.where(ids < 0, self.num_embeddings, ids)

    def forward(self, params, ids, *, key=None):
        self._check_ids(ids)
        # an id out of range looks up NaN (mode="fill"): loud, where a wrapped or clamped row would be silent
        y = jnp.take(params["W"], self._in_range(ids), axis=0, mode="fill", fill_value=jnp.nan)
        return y, ids

    def backward(self, params, ids, dy):
        rows = self._in_range(ids).reshape(-1)  # out of range: dropped (mode="drop"), never another row
        dW = jnp.zeros_like(params["W"]).at[rows].add(dy.reshape(-1, self.features), mode="drop")
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
