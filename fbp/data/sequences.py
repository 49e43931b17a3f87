"""Sequence data sets, in memory and offline: the digits read row by row, the adding problem, a copy task.

Every input is ``(n, time, features)`` float32, as the recurrent layers, Conv1D and attention take it::

    ds = fbp.data.load_digits_rows()                         # (n, 8, 8): 8 steps of 8 pixels, 10 classes
    ds = fbp.data.adding_problem(jax.random.PRNGKey(0))      # (n, 50, 2) -> (n, 1) float targets (MSE)
    ds = fbp.data.copy_task(jax.random.PRNGKey(0))           # (n, 30, 10) -> (n, 30) labels per step

The two synthetic tasks are the classic tests of long memory: what the model must
remember sits at the start of the sequence and is asked for only at the end, so the
gradient that teaches it has to travel back through every step in between.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fbp.data.dataset import Dataset, train_test_split
from fbp.data.images import digits_arrays


def load_digits_rows(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as sequences: row r of the image is time step r.

    Inputs ``(n, 8, 8)`` float32 in [0, 1] (time 8, features 8); labels ``(n,)`` int32
    in [0, 10). The split is ``load_digits``'s: the same 1438 train and 359 test images.
    """
    images, labels = digits_arrays()
    return Dataset("digits-rows", *train_test_split(images, labels, test_fraction=test_fraction, seed=split_seed), 10)


def _check_positive(where: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


def _split_fixed(x, y, test_fraction: float, where: str):
    """The examples are i.i.d., so the last ``test_fraction`` of them are the test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{where}: test_fraction must lie in (0, 1), got {test_fraction!r}")
    n = x.shape[0]
    num_test = max(1, round(n * test_fraction))
    if num_test >= n:
        raise ValueError(f"{where}: {n} examples leave none for training with test_fraction={test_fraction}")
    x, y = np.asarray(x), np.asarray(y)
    return x[: n - num_test], y[: n - num_test], x[n - num_test :], y[n - num_test :]


# the variance of the sum of two U(0, 1) values: the MSE of always answering the mean, 1
ADDING_BASELINE_MSE = 2.0 / 12.0


def adding_problem(
    key: jax.Array, *, num_examples: int = 5000, length: int = 50, test_fraction: float = 0.2
) -> Dataset:
    """The adding problem (Hochreiter & Schmidhuber 1997; this variant as in Le et al. 2015).

    Each step has two features: a value drawn from U(0, 1) and a marker, 1 at exactly two
    steps (one in the first half of the sequence, one in the second) and 0 elsewhere. The
    target is the sum of the two marked values. Answering the mean, 1, scores an MSE of
    1/6 (``ADDING_BASELINE_MSE``, about 0.167), so a model beats that only by remembering
    a value across up to ``length - 1`` steps.

    Args:
      key: a PRNG key; the same key gives the same data.
      num_examples: train + test examples (default 5000: 4000 train, 1000 test).
      length: time steps T (>= 2; default 50).
      test_fraction: the share of examples held out for test.

    Returns:
      A Dataset with inputs ``(n, T, 2)`` float32 and targets ``(n, 1)`` float32 in [0, 2).
    """
    _check_positive("adding_problem", num_examples=num_examples, length=length)
    if length < 2:
        raise ValueError(f"adding_problem: length must be >= 2 (one marker in each half), got {length}")
    x, y = _adding(key, int(num_examples), int(length))
    return Dataset("adding", *_split_fixed(x, y, test_fraction, "adding_problem"), None)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile instead of one per random op
def _adding(key, num_examples: int, length: int):
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (num_examples, length))
    half = length // 2
    first = jax.random.randint(first_key, (num_examples,), 0, half)
    second = jax.random.randint(second_key, (num_examples,), half, length)
    steps = jnp.arange(length)[None, :]
    markers = ((steps == first[:, None]) | (steps == second[:, None])).astype(values.dtype)
    target = jnp.sum(values * markers, axis=1, keepdims=True)
    return jnp.stack([values, markers], axis=-1), target


def copy_baseline_cross_entropy(symbols: int = 8, copy_length: int = 5, delay: int = 20) -> float:
    """The cross-entropy per step (nats) of the best model without memory for ``copy_task``:
    certain of every blank, uniform over the symbols at the ``copy_length`` steps that recall them."""
    return copy_length * math.log(symbols) / (2 * copy_length + delay)


def copy_task(
    key: jax.Array, *, num_examples: int = 5000, symbols: int = 8, copy_length: int = 5, delay: int = 20,
    test_fraction: float = 0.2,
) -> Dataset:
    """The copy task (Hochreiter & Schmidhuber 1997; this layout as in Arjovsky et al. 2016).

    Tokens: 0 is blank, 1 .. ``symbols`` the symbols, ``symbols + 1`` the delimiter. A
    sequence is ``copy_length`` random symbols, ``delay - 1`` blanks, the delimiter, then
    ``copy_length`` blanks: T = 2 ``copy_length`` + ``delay`` steps. The label at every step
    is blank, except the last ``copy_length`` steps, which must repeat the symbols in order.
    Without memory the best cross-entropy is ``copy_baseline_cross_entropy(...)`` per step
    (about 0.347 nats at the defaults).

    Args:
      key: a PRNG key; the same key gives the same data.
      num_examples: train + test examples (default 5000: 4000 train, 1000 test).
      symbols: the alphabet size (default 8).
      copy_length: how many symbols to remember (default 5).
      delay: steps from the first symbol to the delimiter (default 20).
      test_fraction: the share of examples held out for test.

    Returns:
      A Dataset with one-hot inputs ``(n, T, symbols + 2)`` float32 and labels ``(n, T)``
      int32 in [0, symbols], ``num_classes = symbols + 2``.
    """
    _check_positive("copy_task", num_examples=num_examples, symbols=symbols, copy_length=copy_length, delay=delay)
    ids, labels = _copy(key, int(num_examples), int(symbols), int(copy_length), int(delay))
    x = np.asarray(jax.nn.one_hot(ids, symbols + 2, dtype=jnp.float32))
    return Dataset("copy", *_split_fixed(x, labels, test_fraction, "copy_task"), symbols + 2)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _copy(key, num_examples: int, symbols: int, copy_length: int, delay: int):
    content = jax.random.randint(key, (num_examples, copy_length), 1, symbols + 1)
    blanks = jnp.zeros((num_examples, delay - 1), content.dtype)
    delimiter = jnp.full((num_examples, 1), symbols + 1, content.dtype)
    answer_blanks = jnp.zeros((num_examples, copy_length), content.dtype)
    ids = jnp.concatenate([content, blanks, delimiter, answer_blanks], axis=1)
    labels = jnp.concatenate([jnp.zeros((num_examples, copy_length + delay), content.dtype), content], axis=1)
    return ids.astype(jnp.int32), labels.astype(jnp.int32)
