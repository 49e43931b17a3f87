"""Synthetic data sets, keyed: Gaussian blobs (classification) and a smooth nonlinear target (regression)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fbp.data.dataset import Dataset, train_test_split


def synthetic_classification(
    key: jax.Array, *, num_examples: int = 2000, num_features: int = 20, num_classes: int = 4,
    test_fraction: float = 0.2,
) -> Dataset:
    """Gaussian blobs: class c's inputs are N(mu_c, I) around random centres mu_c ~ N(0, I / 4),
    which overlap a little. Inputs ``(n, num_features)`` float32; labels ``(n,)`` int32."""
    x, labels = _blobs(key, num_examples, num_features, num_classes)
    x_train, y_train, x_test, y_test = train_test_split(
        np.asarray(x, np.float32), np.asarray(labels, np.int32), test_fraction=test_fraction
    )
    return Dataset("synthetic-classification", x_train, y_train, x_test, y_test, num_classes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # one compile instead of one per random op
def _blobs(key, num_examples: int, num_features: int, num_classes: int):
    center_key, label_key, noise_key = jax.random.split(key, 3)
    centers = 0.5 * jax.random.normal(center_key, (num_classes, num_features))
    labels = jax.random.randint(label_key, (num_examples,), 0, num_classes)
    return centers[labels] + jax.random.normal(noise_key, (num_examples, num_features)), labels


def synthetic_regression(
    key: jax.Array, *, num_examples: int = 2000, num_features: int = 8, num_outputs: int = 1,
    noise: float = 0.1, test_fraction: float = 0.2,
) -> Dataset:
    """A smooth nonlinear target: y = sin(x A) + 0.5 x B + noise, x ~ N(0, I).

    Inputs ``(n, num_features)``; targets ``(n, num_outputs)`` float32 with
    noise standard deviation ``noise`` (the best achievable test MSE is noise**2).
    """
    x, y = _smooth_target(key, num_examples, num_features, num_outputs, noise)
    x_train, y_train, x_test, y_test = train_test_split(
        np.asarray(x, np.float32), np.asarray(y, np.float32), test_fraction=test_fraction
    )
    return Dataset("synthetic-regression", x_train, y_train, x_test, y_test, None)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _smooth_target(key, num_examples: int, num_features: int, num_outputs: int, noise: float):
    x_key, a_key, b_key, noise_key = jax.random.split(key, 4)
    x = jax.random.normal(x_key, (num_examples, num_features))
    a = jax.random.normal(a_key, (num_features, num_outputs)) / np.sqrt(num_features)
    b = jax.random.normal(b_key, (num_features, num_outputs)) / np.sqrt(num_features)
    return x, jnp.sin(x @ a) + 0.5 * (x @ b) + noise * jax.random.normal(noise_key, (num_examples, num_outputs))

