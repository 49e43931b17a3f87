"""The Dataset type, the fixed train/test split and the finiteness check every data set passes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A data set split into train and test arrays (numpy).

    Attributes:
      name: e.g. ``"digits"``.
      x_train: ``(n_train, *input_shape)`` inputs: float32 features (images ``(H, W, C)``,
        sequences ``(time, features)``) or int32 token ids ``(time,)``.
      y_train: ``(n_train,)`` int32 labels, ``(n_train, time)`` int32 labels per step, or
        ``(n_train, num_outputs)`` float32 targets.
      x_test, y_test: the same for the test split.
      num_classes: the number of classes, or None for regression.
      vocabulary: text data only: the characters of ids ``0 .. len(vocabulary) - 1``; id
        ``len(vocabulary)`` stands for a character the training text lacks. None otherwise.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    vocabulary: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Logits per example (classification) or targets per example (regression)."""
        return self.num_classes if self.num_classes is not None else int(self.y_train.shape[-1])

    @property
    def per_step(self) -> bool:
        """Whether every time step has its own label (``y: (n, time)`` integers), as in a language model."""
        return self.num_classes is not None and self.y_train.ndim == 2


def train_test_split(x, y, *, test_fraction: float = 0.2, seed: int = 0):
    """A fixed random split: the same ``seed`` gives the same split on every machine.

    Returns:
      ``(x_train, y_train, x_test, y_test)`` as numpy arrays.
    """
    n = check_pair(x, y, "train_test_split")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split: test_fraction must lie in (0, 1), got {test_fraction!r}")
    num_test = max(1, round(n * test_fraction))
    if num_test >= n:
        raise ValueError(f"train_test_split: {n} examples leave none for training with test_fraction={test_fraction}")
    order = np.random.default_rng(seed).permutation(n)  # numpy: no compile for a one-off shuffle
    test, train = order[:num_test], order[num_test:]
    x, y = np.asarray(x), np.asarray(y)
    return x[train], y[train], x[test], y[test]


def check_finite(dataset: Dataset) -> None:
    """Raise ValueError if any float array of ``dataset`` holds NaN or Inf, naming the array,
    how many values and the index of the first; likewise for integers out of range (``check_indices``).

    This is where data enters training (``fit`` runs it): values that under jit
    could only turn into a NaN loss or a silently wrong row are refused here.
    """
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a = getattr(dataset, field)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        bad = ~np.isfinite(a)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{dataset.name}: {field} {a.shape} holds {count} non-finite value(s) (NaN or Inf), "
                f"the first at index {first}; clean the data before training"
            )
    check_indices(dataset)


def check_indices(dataset: Dataset) -> None:
    """Raise ValueError for integer labels outside ``[0, num_classes)`` or negative integer inputs (token ids;
    with a vocabulary, ids past ``len(vocabulary)``), naming the array, how many values and the first index."""
    bounds = {}
    if dataset.num_classes is not None:
        bounds.update(y_train=dataset.num_classes, y_test=dataset.num_classes)
    ids = None if dataset.vocabulary is None else len(dataset.vocabulary) + 1  # + 1: the unknown character
    bounds.update(x_train=ids, x_test=ids)
    for field, high in bounds.items():
        a = np.asarray(getattr(dataset, field))
        if not np.issubdtype(a.dtype, np.integer) or not a.size:
            continue
        bad = (a < 0) | (a >= high) if high is not None else a < 0
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = f"[0, {high})" if high is not None else ">= 0"
            raise ValueError(
                f"{dataset.name}: {field} {a.shape} holds {count} value(s) outside {allowed}, the first "
                f"{int(a[first])} at index {first}; an id or label out of range would wrap or vanish under jit"
            )



def check_pair(x, y, where: str) -> int:
    x_shape, y_shape = np.shape(x), np.shape(y)
    if len(x_shape) < 1 or len(y_shape) < 1 or x_shape[0] != y_shape[0]:
        raise ValueError(f"{where}: expected x and y with the same leading axis, got shapes {x_shape} and {y_shape}")
    return int(x_shape[0])

