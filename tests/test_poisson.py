"""fbp.data.poisson_batches: the sampling the DP accountant assumes, padded to a static shape.

The statistical tests draw with fixed keys, so they are deterministic; their bounds (5 standard
errors) are what a correct sampler passes with probability above 1 - 1e-6 for a random key, so
a key change will not make them flaky, while a sampler off by a few percent in rate or variance
fails them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import data

N, Q, STEPS = 1000, 0.05, 2000  # mean batch 50, sd 6.9; 2000 steps: 1e5 expected draws


@pytest.fixture(scope="module")
def drawn():
    """x row i holds i + 1 in every feature (so a zero row is padding), y = i + 1."""
    x = jnp.tile(jnp.arange(1, N + 1, dtype=jnp.float32)[:, None], (1, 3))
    y = jnp.arange(1, N + 1, dtype=jnp.int32)
    return x, y, data.poisson_batches(x, y, Q, STEPS, key=jax.random.PRNGKey(0), max_batch_size=100)


def test_shapes_and_dtypes(drawn):
    x, y, batches = drawn
    assert batches.xs.shape == (STEPS, 100, 3) and batches.xs.dtype == x.dtype
    assert batches.ys.shape == (STEPS, 100) and batches.ys.dtype == y.dtype
    assert batches.mask.shape == (STEPS, 100) and batches.mask.dtype == jnp.bool_


def test_batch_sizes_follow_binomial(drawn):
    sizes = np.asarray(drawn[2].mask.sum(axis=1))
    mean, variance = N * Q, N * Q * (1 - Q)
    # mean of STEPS binomials: standard error sqrt(variance / STEPS) = 0.15
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(variance / STEPS)
    # sample variance: standard error about variance * sqrt(2 / STEPS) = 1.5 (near-normal counts)
    assert abs(sizes.var(ddof=1) - variance) < 5 * variance * np.sqrt(2 / STEPS)


def test_every_example_is_sampled_at_rate_q(drawn):
    """Each example's count over the steps is Binomial(STEPS, Q), independently: the sum of
    squared standardised counts is chi-square with N degrees of freedom (mean N, sd sqrt(2N))."""
    batches = drawn[2]
    ids = np.asarray(batches.ys)[np.asarray(batches.mask)] - 1
    counts = np.bincount(ids, minlength=N)
    expected, variance = STEPS * Q, STEPS * Q * (1 - Q)
    chi_square = ((counts - expected) ** 2 / variance).sum()
    assert abs(chi_square - N) < 5 * np.sqrt(2 * N)


def test_rows_are_the_sampled_examples_and_padding_is_zero(drawn):
    x, _, batches = drawn
    xs, ys, mask = (np.asarray(a) for a in batches)
    assert np.all(xs[~mask] == 0) and np.all(ys[~mask] == 0)
    # a sampled row is example ys - 1, whole, and no example appears twice in a batch
    np.testing.assert_array_equal(xs[mask], np.asarray(x)[ys[mask] - 1])
    for row_ids, row_mask in zip(ys[:50], mask[:50]):
        taken = row_ids[row_mask]
        assert len(set(taken.tolist())) == len(taken)
    # sampled rows come first, padding after
    assert np.all(np.diff(mask.astype(np.int8), axis=1) <= 0)


def test_same_key_same_batches_and_steps_differ():
    x, y = jnp.ones((50, 2)), jnp.arange(50)
    first = data.poisson_batches(x, y, 0.2, 4, key=jax.random.PRNGKey(3), max_batch_size=30)
    second = data.poisson_batches(x, y, 0.2, 4, key=jax.random.PRNGKey(3), max_batch_size=30)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.ys[0], first.ys[1])


def test_images_and_numpy_inputs():
    x = np.random.default_rng(0).random((40, 4, 4, 1), dtype=np.float32)
    y = np.arange(40, dtype=np.int32)
    batches = data.poisson_batches(x, y, 0.25, 3, key=jax.random.PRNGKey(1), max_batch_size=25)
    assert batches.xs.shape == (3, 25, 4, 4, 1)
    xs, ys, mask = (np.asarray(a) for a in batches)
    np.testing.assert_array_equal(xs[mask], x[ys[mask]])
    assert np.all(xs[~mask] == 0)


def test_max_batch_size_above_n_pads():
    x, y = jnp.ones((5, 2)), jnp.arange(5)
    batches = data.poisson_batches(x, y, 1.0, 2, key=jax.random.PRNGKey(0), max_batch_size=8)
    assert batches.xs.shape == (2, 8, 2)
    np.testing.assert_array_equal(batches.mask.sum(axis=1), [5, 5])  # q = 1 takes everyone
    assert np.all(np.asarray(batches.xs)[:, 5:] == 0)


def test_default_max_batch_size():
    # MNIST: mean 512, sd 22.5; one overflow in 1e9 runs of 4690 steps needs 683
    assert data.poisson_max_batch_size(60_000, 512 / 60_000, 4690) == 683
    assert data.poisson_max_batch_size(10, 1.0, 5) == 10  # never more than the data
    x, y = jnp.ones((N, 1)), jnp.arange(N)
    batches = data.poisson_batches(x, y, Q, 2, key=jax.random.PRNGKey(0))
    assert batches.xs.shape[1] == data.poisson_max_batch_size(N, Q, 2)


def test_overflow_raises_by_default():
    x, y = jnp.ones((100, 1)), jnp.arange(100)
    with pytest.raises(ValueError, match=r"max_batch_size=10.*poisson_max_batch_size\(100, 0.5, 3\)"):
        data.poisson_batches(x, y, 0.5, 3, key=jax.random.PRNGKey(0), max_batch_size=10)


def test_overflow_truncate_keeps_a_full_batch_and_warns():
    x, y = jnp.arange(100.0)[:, None], jnp.arange(100)
    with pytest.warns(UserWarning, match="not exactly Poisson sampled"):
        batches = data.poisson_batches(x, y, 0.5, 3, key=jax.random.PRNGKey(0), max_batch_size=10, overflow="truncate")
    np.testing.assert_array_equal(batches.mask.sum(axis=1), [10, 10, 10])
    # the kept ones are among the sampled: compare with the untruncated draw of the same key
    full = data.poisson_batches(x, y, 0.5, 3, key=jax.random.PRNGKey(0), max_batch_size=100)
    for kept, sampled, sampled_mask in zip(batches.ys, full.ys, full.mask):
        assert set(np.asarray(kept).tolist()) <= set(np.asarray(sampled)[np.asarray(sampled_mask)].tolist())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 4.0}, "max_batch_size"),
        ({"overflow": "drop"}, "overflow"),
        ({"y": jnp.arange(9)}, "same leading axis"),
    ],
)
def test_rejects(change, match):
    arguments = {
        "x": jnp.ones((10, 2)),
        "y": jnp.arange(10),
        "sampling_rate": 0.5,
        "steps": 2,
        "key": jax.random.PRNGKey(0),
        "max_batch_size": 10,
    } | change
    with pytest.raises(ValueError, match=match):
        data.poisson_batches(**arguments)
