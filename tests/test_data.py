"""fbp.data: keyed batching, the fixed split, IDX files, the built-in data sets and their errors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import data


def _xy(n=10):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return x, np.arange(n, dtype=np.int32)


# --- batching ------------------------------------------------------------------------------------


def test_batches_drop_keeps_full_batches_in_order_without_a_key():
    x, y = _xy(10)
    b = data.batches(x, y, 4)
    assert b.xs.shape == (2, 4, 3) and b.ys.shape == (2, 4) and b.weights.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(b.ys).ravel(), np.arange(8))
    np.testing.assert_array_equal(np.asarray(b.xs)[1, 0], x[4])
    assert np.all(np.asarray(b.weights) == 1.0)


def test_batches_pad_marks_padding_with_zero_weight():
    x, y = _xy(10)
    b = data.batches(x, y, 4, key=jax.random.PRNGKey(3), remainder="pad")
    assert b.xs.shape == (3, 4, 3)
    weights = np.asarray(b.weights).ravel()
    assert weights.sum() == 10 and np.all(weights[10:] == 0)
    # the real (weight 1) examples are each example exactly once
    real = np.asarray(b.ys).ravel()[weights == 1]
    np.testing.assert_array_equal(np.sort(real), y)


def test_shuffle_is_a_permutation_drawn_from_the_key():
    x, y = _xy(64)
    first = data.batches(x, y, 8, key=data.epoch_key(0, 1))
    again = data.batches(x, y, 8, key=data.epoch_key(0, 1))
    other = data.batches(x, y, 8, key=data.epoch_key(0, 2))
    np.testing.assert_array_equal(np.sort(np.asarray(first.ys).ravel()), y)
    np.testing.assert_array_equal(first.ys, again.ys)
    assert not np.array_equal(first.ys, other.ys)
    # inputs travel with their labels: x[i, 0] == 3 * y[i] by construction
    np.testing.assert_array_equal(np.asarray(first.xs)[..., 0], 3 * np.asarray(first.ys))


def test_batches_accepts_device_arrays():
    x, y = _xy(12)
    b = data.batches(jnp.asarray(x), jnp.asarray(y), 6, key=jax.random.PRNGKey(0))
    assert b.xs.shape == (2, 6, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 11}, "make no full batch of 11"),
        ({"batch_size": 4, "remainder": "keep"}, "remainder must be 'drop' or 'pad'"),
    ],
)
def test_batches_rejects_bad_arguments(kwargs, match):
    x, y = _xy(10)
    with pytest.raises(ValueError, match=match):
        data.batches(x, y, **kwargs)


def test_batches_rejects_mismatched_lengths():
    x, y = _xy(10)
    with pytest.raises(ValueError, match=r"same leading axis, got shapes \(10, 3\) and \(9,\)"):
        data.batches(x, y[:9], 2)


# --- split and generators ----------------------------------------------------------------------------


def test_train_test_split_is_fixed_disjoint_and_complete():
    x, y = _xy(50)
    a = data.train_test_split(x, y, test_fraction=0.2, seed=1)
    b = data.train_test_split(x, y, test_fraction=0.2, seed=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert len(a[3]) == 10 and len(a[1]) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate([a[1], a[3]])), y)
    with pytest.raises(ValueError, match="test_fraction must lie in"):
        data.train_test_split(x, y, test_fraction=1.0)


@pytest.mark.parametrize("generator", [data.synthetic_classification, data.synthetic_regression])
def test_synthetic_generators_are_keyed(generator):
    a = generator(jax.random.PRNGKey(0), num_examples=100)
    b = generator(jax.random.PRNGKey(0), num_examples=100)
    c = generator(jax.random.PRNGKey(1), num_examples=100)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape[0] + a.x_test.shape[0] == 100
    assert a.x_train.dtype == np.float32


def test_synthetic_shapes_and_task():
    classification = data.synthetic_classification(jax.random.PRNGKey(0), num_features=5, num_classes=3)
    assert classification.input_shape == (5,) and classification.num_outputs == 3
    assert classification.y_train.dtype == np.int32 and set(np.unique(classification.y_train)) <= {0, 1, 2}
    regression = data.synthetic_regression(jax.random.PRNGKey(0), num_outputs=2)
    assert regression.num_classes is None and regression.num_outputs == 2
    assert regression.y_train.shape[1:] == (2,)


def test_digits_is_bundled_and_scaled():
    ds = data.load("digits")
    assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.num_classes == 10 and ds.y_train.dtype == np.int32


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"fbp\[data\]"):
        data.load_digits()


def test_load_rejects_unknown_names_and_mnist_without_a_folder():
    with pytest.raises(ValueError, match="unknown data set 'cifar'; choose from digits"):
        data.load("cifar")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load("mnist")


def test_check_finite_names_array_count_and_first_index():
    ds = data.synthetic_regression(jax.random.PRNGKey(0), num_examples=50)
    x = ds.x_train.copy()
    x[7, 2] = np.nan
    x[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"x_train \(40, 8\) holds 2 non-finite value\(s\).*first at index \(7, 2\)"):
        data.check_finite(ds._replace(x_train=x))
    data.check_finite(ds)  # clean data passes


# --- IDX / MNIST -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) % 250).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a.idx{suffix}"
    data.write_idx(path, array)
    back = data.read_idx(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def _write_mnist(folder, n_train=12, n_test=6, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        data.write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,), np.uint8))
    return folder


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_from_local_idx_files(tmp_path, gz, name):
    folder = _write_mnist(tmp_path / "m", gz=gz)
    ds = data.load(name, data_dir=folder)
    assert ds.name == name
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (6, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int32 and ds.y_train.max() < 10


def test_mnist_missing_file_names_what_and_where(tmp_path):
    folder = _write_mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"MNIST: expected t10k-labels-idx1-ubyte\[\.gz\] in .*m, found "
                                                 r"t10k-images-idx3-ubyte\.gz, train-images"):
        data.load_mnist(folder)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST: data folder .*nowhere does not exist"):
        data.load_mnist(tmp_path / "nowhere", name="fashion-mnist")


def test_mnist_bad_magic_number(tmp_path):
    folder = _write_mnist(tmp_path / "m", gz=False)
    # labels where images belong: magic 0x00000801 instead of 0x00000803
    data.write_idx(folder / "train-images-idx3-ubyte", np.zeros((12,), np.uint8))
    with pytest.raises(ValueError, match=r"bad magic number 0x00000801 in .*train-images-idx3-ubyte, "
                                         r"expected 0x00000803"):
        data.load_mnist(folder)


def test_idx_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    data.write_idx(path, np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"header says shape \(4, 5, 5\) \(100 bytes of data\).*holds 93"):
        data.read_idx(path)
    garbage = tmp_path / "g.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file .*g.gz"):
        data.read_idx(garbage)


def test_mnist_count_mismatch(tmp_path):
    folder = _write_mnist(tmp_path / "m")
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros((11,), np.uint8))
    with pytest.raises(ValueError, match="train split in .* has 12 images but 11 labels"):
        data.load_mnist(folder)
