"""Data: in-memory data sets, a fixed train/test split, and keyed batching.

Nothing here downloads anything. The built-in data sets are::

    ds = fbp.data.load("digits")                      # scikit-learn's 8x8 digits (extra: fbp[data])
    ds = fbp.data.load("mnist", data_dir="~/mnist")   # local IDX files, .gz or raw
    ds = fbp.data.synthetic_classification(jax.random.PRNGKey(0))

and batching takes an explicit PRNG key, so an epoch's order is a pure
function of ``(seed, epoch)``::

    b = fbp.data.batches(ds.x_train, ds.y_train, 32, key=fbp.data.epoch_key(seed, epoch))
    state, metrics = fbp.train_epoch(step, state, b.xs, b.ys)   # xs: (num_batches, 32, ...)
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("digits", "mnist", "fashion-mnist", "synthetic-classification", "synthetic-regression")


class Dataset(NamedTuple):
    """A data set split into train and test arrays (numpy, float32 inputs).

    Attributes:
      name: e.g. ``"digits"``.
      x_train: ``(n_train, *input_shape)`` inputs; images are ``(H, W, C)``.
      y_train: ``(n_train,)`` int32 labels, or ``(n_train, num_outputs)`` float32 targets.
      x_test, y_test: the same for the test split.
      num_classes: the number of classes, or None for regression.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Logits per example (classification) or targets per example (regression)."""
        return self.num_classes if self.num_classes is not None else int(self.y_train.shape[-1])


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
    n = _check_pair(x, y, "batches")
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


def train_test_split(x, y, *, test_fraction: float = 0.2, seed: int = 0):
    """A fixed random split: the same ``seed`` gives the same split on every machine.

    Returns:
      ``(x_train, y_train, x_test, y_test)`` as numpy arrays.
    """
    n = _check_pair(x, y, "train_test_split")
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
    how many values and the index of the first."""
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


# --- built-in data sets ------------------------------------------------------------------------


def load(name: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """A built-in data set by name (one of ``DATASETS``).

    Args:
      name: ``digits``, ``mnist``, ``fashion-mnist``, ``synthetic-classification``
        or ``synthetic-regression``.
      data_dir: the folder of IDX files, for ``mnist`` and ``fashion-mnist``.
      seed: seeds the synthetic generators (the digits split is fixed).
    """
    if name == "digits":
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        if data_dir is None:
            raise ValueError(
                f"{name}: needs data_dir (--data-dir), a folder holding the four IDX files "
                f"({', '.join(f + '[.gz]' for f in IDX_FILES.values())}); fbp downloads nothing"
            )
        return load_mnist(data_dir, name=name)
    if name == "synthetic-classification":
        return synthetic_classification(jax.random.PRNGKey(seed))
    if name == "synthetic-regression":
        return synthetic_regression(jax.random.PRNGKey(seed))
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no network.

    Inputs ``(n, 8, 8, 1)`` float32 scaled to [0, 1]; labels int32. The split is
    fixed by ``split_seed``: 1437 train, 360 test by default.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set comes with scikit-learn, which is not installed; "
            "install the extra: pip install 'fbp[data]'"
        ) from error
    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = bunch.target.astype(np.int32)
    return Dataset("digits", *train_test_split(x, y, test_fraction=test_fraction, seed=split_seed), 10)


# IDX, the format of MNIST: a big-endian header (magic 0x0000 <type> <ndim>, then ndim uint32
# sizes) followed by the raw array. Type 0x08 is unsigned byte.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in ``.gz``).

    Raises:
      ValueError: a bad magic number, or a file shorter or longer than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # a truncated .gz fails here
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"bad magic number 0x{magic:08x} in {path}, expected 0x{expected_magic:08x}")
    if magic >> 16 != 0 or type_code not in _IDX_TYPES:
        raise ValueError(f"bad magic number 0x{magic:08x} in {path}, expected 0x0000TTDD (an IDX file)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: the header says shape {shape} ({expected} bytes of data), but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array) -> None:
    """Write an array as an IDX file (gzipped when the name ends in ``.gz``); uint8 arrays give
    exactly MNIST's format."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    if array.dtype not in codes:
        raise TypeError(f"write_idx: cannot store dtype {array.dtype}; IDX holds {sorted(map(str, codes))}")
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


def load_mnist(data_dir: str | os.PathLike, *, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST (same format) from the four IDX files in ``data_dir``.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or
    ``.gz``. The split is the files' own. Inputs ``(n, 28, 28, 1)`` float32 in
    [0, 1]; labels int32 in [0, 10).
    """
    title = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}.get(name, name)
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{title}: data folder {folder} does not exist")
    arrays = {}
    for field, stem in IDX_FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            found = sorted(p.name for p in folder.iterdir())
            shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
            raise FileNotFoundError(f"{title}: expected {stem}[.gz] in {folder}, found {shown}")
        expected_magic = 0x00000803 if field.startswith("x") else 0x00000801
        arrays[field] = read_idx(path, expected_magic=expected_magic)
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{title}: {split} split in {folder} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(f"{title}: {split} labels in {folder} must lie in [0, 10), got max {labels.max()}")
    images = {k: (arrays[k].astype(np.float32) / 255.0)[..., None] for k in ("x_train", "x_test")}
    return Dataset(
        name, images["x_train"], arrays["y_train"].astype(np.int32), images["x_test"],
        arrays["y_test"].astype(np.int32), 10,
    )


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


def _check_pair(x, y, where: str) -> int:
    x_shape, y_shape = np.shape(x), np.shape(y)
    if len(x_shape) < 1 or len(y_shape) < 1 or x_shape[0] != y_shape[0]:
        raise ValueError(f"{where}: expected x and y with the same leading axis, got shapes {x_shape} and {y_shape}")
    return int(x_shape[0])
