"""Keyed batching: an epoch's order is a pure function of ``(seed, epoch)``, batches stacked for lax.scan."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.data.dataset import check_pair


class Batches(NamedTuple):
    """One epoch of batches, stacked: ``xs: (num_batches, batch_size, ...)``, ``ys`` likewise.

    ``weights: (num_batches, batch_size)`` is 1.0 for a real example and 0.0 for
    padding (only ``remainder="pad"`` pads); weight per-example losses by it.
    """

    xs: jax.Array
    ys: jax.Array
    weights: jax.Array


def epoch_key(seed: int, epoch: int) -> jax.Array:
    """The key that orders epoch ``epoch``: a function of (seed, epoch) only, so a resumed run
    sees the same order as an uninterrupted one."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), epoch)


def batches(x, y, batch_size: int, *, key: jax.Array | None = None, remainder: str = "drop") -> Batches:
    """Cut ``(x, y)`` into stacked batches, shuffled by ``key`` (in order when None).

    Args:
      x: ``(n, ...)`` inputs. y: ``(n, ...)`` targets.
      batch_size: examples per batch.
      key: a PRNG key for the order; None keeps the given order.
      remainder: ``"drop"`` the last ``n % batch_size`` examples (every batch
        full, the default for training), or ``"pad"`` them to a full batch
        with copies of example 0 whose weight is 0.

    Returns:
      Batches with ``xs: (num_batches, batch_size, ...)``, ``ys`` likewise and
      ``weights: (num_batches, batch_size)``.
    """
    n = check_pair(x, y, "batches")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batches: batch_size must be a positive int, got {batch_size!r}")
    if remainder not in ("drop", "pad"):
        raise ValueError(f"batches: remainder must be 'drop' or 'pad', got {remainder!r}")
    if remainder == "drop" and n < batch_size:
        raise ValueError(
            f"batches: {n} examples make no full batch of {batch_size}; lower batch_size or use remainder='pad'"
        )
    num_batches = n // batch_size if remainder == "drop" else -(-n // batch_size)
    shuffle = key is not None
    key = key if shuffle else jax.random.PRNGKey(0)  # unused without shuffling
    return _stack(jnp.asarray(x), jnp.asarray(y), key, int(batch_size), num_batches, shuffle)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _stack(x, y, key, batch_size: int, num_batches: int, shuffle: bool) -> Batches:
    """One compiled gather per data shape: shuffle, pad with example 0 (weight 0) or drop, stack."""
    n = x.shape[0]
    used = num_batches * batch_size
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    weights = jnp.ones((used,), jnp.float32)
    if used > n:
        weights = weights.at[n:].set(0.0)
        order = jnp.concatenate([order, jnp.zeros((used - n,), order.dtype)])
    order = order[:used]

    def stack(a):
        return jnp.take(a, order, axis=0).reshape(num_batches, batch_size, *a.shape[1:])

    return Batches(stack(x), stack(y), weights.reshape(num_batches, batch_size))

