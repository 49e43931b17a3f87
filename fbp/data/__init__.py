"""Data: in-memory data sets, a fixed train/test split, and keyed batching.

Nothing here downloads anything. The built-in data sets (``DATASETS``, the names of ``fbp train --data``)::

    ds = fbp.data.load("digits")                      # scikit-learn's 8x8 digits (extra: fbp[data])
    ds = fbp.data.load("mnist", data_dir="~/mnist")   # local IDX files, .gz or raw
    ds = fbp.data.synthetic_classification(jax.random.PRNGKey(0))
    ds = fbp.data.load("adding")                      # sequences: also digits-rows, copy
    ds = fbp.data.load("text")                        # characters of the Python stdlib's source; text:PATH for a file

and batching takes an explicit PRNG key, so an epoch's order is a pure
function of ``(seed, epoch)``::

    b = fbp.data.batches(ds.x_train, ds.y_train, 32, key=fbp.data.epoch_key(seed, epoch))
    state, metrics = fbp.train_epoch(step, state, b.xs, b.ys)   # xs: (num_batches, 32, ...)

A module per concept: ``dataset`` (the Dataset type, the split, the finiteness
check), ``batching``, ``images`` (digits, IDX / MNIST), ``synthetic``,
``sequences`` (digits by rows, the adding problem, the copy task), ``text``
(character-level corpora) and ``poisson`` (Poisson-sampled batches for DP-SGD).
Every name is re-exported here: use ``fbp.data.X``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from fbp.data.batching import Batches, batches, epoch_key
from fbp.data.dataset import Dataset, check_finite, check_indices, train_test_split
from fbp.data.images import IDX_FILES, digits_arrays, load_digits, load_mnist, read_idx, write_idx
from fbp.data.poisson import PoissonBatches, poisson_batches, poisson_max_batch_size
from fbp.data.sequences import (
    ADDING_BASELINE_MSE,
    adding_problem,
    copy_baseline_cross_entropy,
    copy_task,
    load_digits_rows,
)
from fbp.data.synthetic import synthetic_classification, synthetic_regression
from fbp.data.text import (
    STDLIB_FILES,
    VOCABULARY_FILE,
    decode,
    encode,
    load_text,
    read_vocabulary,
    save_vocabulary,
    stdlib_text,
    text_dataset,
    unigram_entropy_bits,
)

DATASETS = (
    "digits",
    "mnist",
    "fashion-mnist",
    "synthetic-classification",
    "synthetic-regression",
    "digits-rows",
    "adding",
    "copy",
    "text",
)
TEXT_PREFIX = "text:"  # --data text:PATH: a local text file


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is one of ``DATASETS`` or ``text:PATH``."""
    if name in DATASETS or (isinstance(name, str) and name.startswith(TEXT_PREFIX) and len(name) > len(TEXT_PREFIX)):
        return
    raise ValueError(f"data must be one of {', '.join(DATASETS)}, or text:PATH (a local text file), got {name!r}")


def run_name(name: str) -> str:
    """``name`` as a folder name: ``text:~/books/emma.txt`` -> ``text-emma``; other names unchanged."""
    if name.startswith(TEXT_PREFIX):
        return "text-" + (Path(name[len(TEXT_PREFIX) :]).stem or "file")
    return name


def load(name: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """A built-in data set by name (one of ``DATASETS``, or ``text:PATH``).

    Args:
      name: ``digits``, ``mnist``, ``fashion-mnist``, ``synthetic-classification``,
        ``synthetic-regression``, ``digits-rows``, ``adding``, ``copy``, ``text``
        or ``text:PATH``.
      data_dir: the folder of IDX files, for ``mnist`` and ``fashion-mnist``.
      seed: seeds the synthetic generators (the digits split and the text are fixed).
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
    if name == "digits-rows":
        return load_digits_rows()
    if name == "adding":
        return adding_problem(jax.random.PRNGKey(seed))
    if name == "copy":
        return copy_task(jax.random.PRNGKey(seed))
    if name == "text":
        return load_text()
    if isinstance(name, str) and name.startswith(TEXT_PREFIX) and len(name) > len(TEXT_PREFIX):
        return load_text(name[len(TEXT_PREFIX) :])
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}, or text:PATH")


__all__ = [
    "ADDING_BASELINE_MSE",
    "DATASETS",
    "IDX_FILES",
    "STDLIB_FILES",
    "TEXT_PREFIX",
    "VOCABULARY_FILE",
    "Batches",
    "Dataset",
    "PoissonBatches",
    "adding_problem",
    "batches",
    "check_finite",
    "check_indices",
    "check_name",
    "copy_baseline_cross_entropy",
    "copy_task",
    "decode",
    "digits_arrays",
    "encode",
    "epoch_key",
    "load",
    "load_digits",
    "load_digits_rows",
    "load_mnist",
    "load_text",
    "poisson_batches",
    "poisson_max_batch_size",
    "read_idx",
    "read_vocabulary",
    "run_name",
    "save_vocabulary",
    "stdlib_text",
    "synthetic_classification",
    "synthetic_regression",
    "text_dataset",
    "train_test_split",
    "unigram_entropy_bits",
    "write_idx",
]
