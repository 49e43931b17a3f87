"""Losses with hand-written gradients. Each is a mean over the batch.

Contract::

    value = loss(pred, target)               # a scalar
    value, cache = loss.forward(pred, target)
    dpred = loss.backward(cache)             # d value / d pred, same shape as pred

A single example (no batch axis) is a batch of one, so the mean of the
per-example losses equals the batch loss and per-example gradients average to
the batch gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers.base import is_concrete


def _check_pred(loss, pred):
    if not hasattr(pred, "shape") or not jnp.issubdtype(pred.dtype, jnp.floating):
        got = getattr(pred, "dtype", type(pred).__name__)
        raise TypeError(f"{type(loss).__name__}: expected floating-point predictions, got {got}")


class Loss:
    """Base: ``__call__`` is ``forward`` without the cache."""

    def __call__(self, pred, target):
        return self.forward(pred, target)[0]


@dataclass(frozen=True)
class MSE(Loss):
    """L = mean((pred - target)^2) over every element. Shapes: pred, target (...).

    Cache: (pred - target) scaled by 2 / size, since dL/dpred = 2 (pred - target) / size.
    """

    def forward(self, pred, target):
        _check_pred(self, pred)
        if tuple(jnp.shape(target)) != tuple(pred.shape):
            raise ValueError(f"MSE: expected target of shape {tuple(pred.shape)}, got {tuple(jnp.shape(target))}")
        diff = pred - jnp.asarray(target, pred.dtype)
        return jnp.mean(diff * diff), diff * (2.0 / diff.size)

    def backward(self, cache):
        return cache


def _targets_as_probs(loss, logits, target):
    """Integer labels (...) or probabilities (..., C) -> probabilities (..., C)."""
    target = jnp.asarray(target) if not hasattr(target, "dtype") else target
    num_classes = logits.shape[-1]
    name = type(loss).__name__
    if jnp.issubdtype(target.dtype, jnp.integer):
        if tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"{name}: integer labels must have shape {tuple(logits.shape[:-1])} for logits "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        if is_concrete(target) and target.size:
            values = np.asarray(target)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= num_classes:
                raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got values in [{low}, {high}]")
        return jax.nn.one_hot(target, num_classes, dtype=logits.dtype)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"{name}: expected integer labels {tuple(logits.shape[:-1])} or probabilities "
            f"{tuple(logits.shape)}, got shape {tuple(target.shape)} of dtype {target.dtype}"
        )
    if is_concrete(target) and target.size:
        _check_probabilities(name, np.asarray(target, np.float64), float(jnp.finfo(target.dtype).eps))
    return target.astype(logits.dtype)


def _check_probabilities(name: str, target: np.ndarray, eps: float) -> None:
    """Raise ValueError unless every row of ``target (..., C)`` is >= 0 and sums to 1 within max(0.01, 8 eps).

    0.01, whatever the dtype: probabilities rounded to bfloat16 on the way (then
    cast up, as the checker's float64 reruns do) sum to 1 only within eps/2 = 0.004
    of bfloat16; targets that are not probabilities at all (counts, scores) miss by far more.
    """
    slack = max(1e-2, 8 * eps)
    sums = target.sum(axis=-1)
    bad = ~(np.all(target >= -slack, axis=-1) & (np.abs(sums - 1.0) <= slack))  # NaN fails both
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        row = target[first]
        raise ValueError(
            f"{name}: probability targets must be >= 0 and sum to 1 over the last axis, got a row summing to "
            f"{float(row.sum()):.6g} (min {float(row.min()):.6g}) at index {first}; pass integer labels, or "
            "normalise: t / t.sum(-1, keepdims=True)"
        )


@dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    """L = mean over examples of -sum_c t_c log softmax(z)_c.

    Shapes: logits ``z: (..., C)``; target integer labels ``(...)`` or
    probabilities / one-hot ``(..., C)``. Cache: (softmax(z) sum_c t_c - t) / m
    with m the number of examples, which is exactly dL/dz; sum_c t_c is 1 for
    labels, and kept for probabilities whose sum is 1 only up to rounding.

    Where the targets' values are known (eager calls), labels outside [0, C)
    and probability rows that are negative or do not sum to 1 (within
    max(0.01, 8 eps)) raise ValueError. Under jit they cannot be checked: an
    out-of-range label becomes an all-zero one-hot row (that example adds 0 to
    the loss), and unnormalised probabilities give the cross-entropy against t
    as it is, whose gradient is still exactly the cache above. Check data where
    it enters (``fbp.data.check_finite``, which ``fit`` runs).
    """

    def forward(self, logits, target):
        _check_pred(self, logits)
        if logits.ndim < 1:
            raise ValueError(f"SoftmaxCrossEntropy: expected logits (..., C), got shape {tuple(logits.shape)}")
        probs_target = _targets_as_probs(self, logits, target)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        per_example = -jnp.sum(probs_target * log_p, axis=-1)
        m = per_example.size
        total = jnp.sum(probs_target, axis=-1, keepdims=True)
        return jnp.mean(per_example), (jnp.exp(log_p) * total - probs_target) / m

    def backward(self, cache):
        return cache


@dataclass(frozen=True)
class BinaryCrossEntropy(Loss):
    """L = mean of -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)) over every element.

    From logits, in the stable form softplus(z) - z t (jax.nn.softplus: log(1 + e^z)
    without overflow). Not max(z, 0) - z t + log1p(exp(-|z|)): jax.grad of that
    form takes the subgradients of max and |.| at z == 0 and returns -t instead of
    0.5 - t there, although the loss is smooth.
    Shapes: logits and targets (...), targets in [0, 1]. Cache: (sigmoid(z) - t) / size.

    Targets outside [0, 1] (or NaN) raise ValueError where their values are
    known (eager calls). Under jit they cannot be checked: there the value is
    softplus(z) - z t as written, unbounded below when t > 1 or t < 0, so
    training drives z to +-inf; check data where it enters.
    """

    def forward(self, logits, target):
        _check_pred(self, logits)
        if tuple(jnp.shape(target)) != tuple(logits.shape):
            raise ValueError(
                f"BinaryCrossEntropy: expected targets of shape {tuple(logits.shape)}, got {tuple(jnp.shape(target))}"
            )
        if is_concrete(target) and np.size(target):
            values = np.asarray(target, np.float64)
            if not np.all((values >= 0) & (values <= 1)):  # NaN fails too
                raise ValueError(
                    f"BinaryCrossEntropy: targets must lie in [0, 1], got values in [{np.nanmin(values):g}, "
                    f"{np.nanmax(values):g}]" + (" and NaN" if np.isnan(values).any() else "")
                )
        t = jnp.asarray(target).astype(logits.dtype)
        value = jnp.mean(jax.nn.softplus(logits) - logits * t)
        return value, (jax.nn.sigmoid(logits) - t) / logits.size

    def backward(self, cache):
        return cache


REGISTRY = (MSE, SoftmaxCrossEntropy, BinaryCrossEntropy)
