"""Image data sets: scikit-learn's bundled 8x8 digits, and MNIST / Fashion-MNIST from local IDX files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from fbp.data.dataset import Dataset, train_test_split


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits, no network: ``(images, labels)``.

    Returns:
      images ``(1797, 8, 8)`` float32 scaled to [0, 1] and labels ``(1797,)`` int32 in [0, 10).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set comes with scikit-learn, which is not installed; "
            "install the extra: pip install 'fbp[data]'"
        ) from error
    bunch = sklearn_digits()
    return (bunch.data / 16.0).astype(np.float32).reshape(-1, 8, 8), bunch.target.astype(np.int32)


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no network.

    Inputs ``(n, 8, 8, 1)`` float32 scaled to [0, 1]; labels int32. The split is
    fixed by ``split_seed``: 1438 train, 359 test by default.
    """
    images, labels = digits_arrays()
    x = images[..., None]
    return Dataset("digits", *train_test_split(x, labels, test_fraction=test_fraction, seed=split_seed), 10)


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

