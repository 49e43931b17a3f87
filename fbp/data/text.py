"""Character-level text for language models: a corpus every machine has, any local file, windows of ids.

``load_text()`` reads a fixed selection of the Python standard library's own source
(``STDLIB_FILES``, found through ``sysconfig``): present wherever Python is, nothing
downloaded. ``load_text("notes.txt")`` reads any UTF-8 file instead. Either way::

    ds = fbp.data.load_text(window=64)
    ds.x_train       # (n, 64) int32 character ids
    ds.y_train       # (n, 64) int32: the next character of each position
    ds.vocabulary    # the characters of ids 0 .. V-1; id V stands for an unknown character

The vocabulary is the training text's characters, sorted; the validation text (the
last ``validation_fraction`` of the text, never shuffled into training) may hold
characters the training text lacks, which become the unknown id. Windows do not
overlap, so one epoch reads the training text once.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from fbp.data.dataset import Dataset

# A fixed selection of pure-Python modules that every CPython from 3.8 to 3.13 ships: about
# 248,000 characters in 3.11 (the count differs a little between versions). The validation
# text is the end of the last files (fractions.py in 3.11).
STDLIB_FILES = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "functools.py",
    "queue.py",
    "fnmatch.py",
    "copy.py",
    "shlex.py",
    "random.py",
    "calendar.py",
    "contextlib.py",
    "fractions.py",
)
UNKNOWN = "\ufffd"  # how decode shows the unknown id
VOCABULARY_FILE = "vocabulary.json"


def stdlib_text(files: tuple[str, ...] = STDLIB_FILES) -> str:
    """The source of ``files`` (paths under the standard library's folder), joined by newlines.

    Files this Python lacks are skipped; FileNotFoundError if none is found (a Python
    installed without its ``.py`` sources).
    """
    folder = Path(sysconfig.get_path("stdlib"))
    texts = [(folder / name).read_text(encoding="utf-8", errors="replace") for name in files
             if (folder / name).is_file()]
    if not texts:
        raise FileNotFoundError(
            f"text: none of the standard library sources {', '.join(files)} is in {folder} (a Python without "
            "its .py files?); train on a file of your own instead: --data text:PATH"
        )
    return "\n".join(texts)


def encode(text: str, vocabulary: str) -> np.ndarray:
    """Characters -> int32 ids: the index in ``vocabulary``, or ``len(vocabulary)`` for any other character."""
    index = {char: i for i, char in enumerate(vocabulary)}
    unknown = len(vocabulary)
    return np.fromiter((index.get(char, unknown) for char in text), np.int32, count=len(text))


def decode(ids, vocabulary: str) -> str:
    """int ids -> characters; the unknown id (and anything out of range) shows as U+FFFD."""
    return "".join(vocabulary[i] if 0 <= i < len(vocabulary) else UNKNOWN for i in np.asarray(ids).ravel().tolist())


def unigram_entropy_bits(symbols) -> float:
    """The entropy of the frequencies of ``symbols`` (a string, or an array of ids), in bits per symbol:
    the best a model that ignores context can score on text drawn from the same frequencies."""
    if isinstance(symbols, str):
        counts = np.array(list(Counter(symbols).values()), np.float64)
    else:
        counts = np.unique(np.asarray(symbols).ravel(), return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _windows(ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs ``ids[i T : (i+1) T]``, labels the same shifted by one."""
    count = (len(ids) - 1) // window
    x = ids[: count * window].reshape(count, window)
    y = ids[1 : count * window + 1].reshape(count, window)
    return x, y


def text_dataset(text: str, *, window: int = 64, validation_fraction: float = 0.1, name: str = "text") -> Dataset:
    """A character-level language-modelling Dataset from ``text``.

    Args:
      text: the whole corpus.
      window: T, characters per example (the model's context).
      validation_fraction: the share of the text, taken from its end, held out as the test split.
      name: the Dataset's name.

    Returns:
      A Dataset with ``x: (n, T)`` int32 ids, ``y: (n, T)`` int32 next-character ids,
      ``num_classes = len(vocabulary) + 1`` (the last id is the unknown character) and
      ``vocabulary``, the training text's characters, sorted.
    """
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise ValueError(f"{name}: window must be a positive int, got {window!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"{name}: validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    cut = round(len(text) * (1.0 - validation_fraction))
    train_text, test_text = text[:cut], text[cut:]
    needed = math.ceil((window + 1) / validation_fraction)
    if len(train_text) < window + 1 or len(test_text) < window + 1:
        raise ValueError(
            f"{name}: {len(text)} characters make no window of {window} + 1 in both the training text and the "
            f"last {validation_fraction:g} held out for validation; give at least {needed} characters or a "
            "smaller window"
        )
    vocabulary = "".join(sorted(set(train_text)))
    x_train, y_train = _windows(encode(train_text, vocabulary), window)
    x_test, y_test = _windows(encode(test_text, vocabulary), window)
    return Dataset(name, x_train, y_train, x_test, y_test, len(vocabulary) + 1, vocabulary)


def load_text(
    path: str | os.PathLike | None = None, *, window: int = 64, validation_fraction: float = 0.1
) -> Dataset:
    """``--data text`` (``path`` None: the standard library selection, ``stdlib_text()``) or
    ``--data text:PATH`` (a UTF-8 text file; undecodable bytes become U+FFFD).

    See ``text_dataset`` for what comes back.
    """
    if path is None:
        return text_dataset(stdlib_text(), window=window, validation_fraction=validation_fraction, name="text")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"text: no file {file}" + (" (it is a folder)" if file.is_dir() else ""))
    text = file.read_text(encoding="utf-8", errors="replace")
    return text_dataset(text, window=window, validation_fraction=validation_fraction, name=f"text:{path}")


def save_vocabulary(folder: str | os.PathLike, dataset: Dataset) -> Path:
    """Write ``folder/vocabulary.json``: what ``fbp generate`` needs to turn ids back into text.

    Holds the characters, the unknown id, the window (the model's context) and the
    training text's unigram entropy in bits per character.
    """
    if dataset.vocabulary is None:
        raise ValueError(f"save_vocabulary: data set {dataset.name!r} is not text (it has no vocabulary)")
    content = {
        "characters": dataset.vocabulary,
        "unknown_id": len(dataset.vocabulary),
        "window": int(dataset.x_train.shape[1]),
        "unigram_entropy_bits": unigram_entropy_bits(dataset.y_train),  # every training character but the first
        "data": dataset.name,
    }
    path = Path(folder) / VOCABULARY_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_vocabulary(folder: str | os.PathLike) -> dict:
    """The ``vocabulary.json`` that ``save_vocabulary`` wrote in ``folder``."""
    path = Path(folder) / VOCABULARY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: only a run on text data (--data text or text:PATH) saves a vocabulary"
        )
    content = json.loads(path.read_text(encoding="utf-8"))
    missing = {"characters", "unknown_id", "window"} - set(content)
    if missing:
        raise ValueError(f"{path}: missing {', '.join(sorted(missing))}; was it written by fbp?")
    return content
