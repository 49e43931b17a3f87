"""Per-example gradients: every fast path equals the plain jax.vmap over single examples.

The fast averaged path (``per_example=True``: one backward over the batch with
each example's own dpred / B) and ghost clipping (per-example norms from each
layer's ``per_example_sq_norms``, then one backward with dpred scaled by the
clip factors) are checked against ``per_example="vmap"``, which materialises
every example's gradient, in float64 (to rounding) and float32 (the two orders
of summation differ by a few ulps of the largest term).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp.grads import clip_and_average, clipped_value_and_grad
from fbp.layers.base import per_example_outer_sq_norms

BATCH = 5
TOLERANCE = {"float32": {"rtol": 2e-5, "atol": 2e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


def _normal(*shape):
    return lambda key, dtype: jax.random.normal(key, (BATCH, *shape), dtype)


def _labels(*shape, classes=3):
    return lambda key, dtype: jax.random.randint(key, (BATCH, *shape), 0, classes)


def _ids(*shape, vocabulary):
    return lambda key, dtype: jax.random.randint(key, (BATCH, *shape), 0, vocabulary)


# name -> (model, loss, make_x, make_y); x may carry extra axes after the batch axis
MODELS = {
    "dense": (fbp.Sequential([fbp.Dense(6), fbp.Tanh(), fbp.Dense(3)]), fbp.SoftmaxCrossEntropy(), _normal(5), _labels()),
    # (B, T, F): Gram form (T (in + out) < in out) in the first Dense, the matrix in the others
    "dense-sequence": (
        fbp.Sequential([fbp.Dense(32), fbp.GELU(), fbp.Dense(3)]), fbp.SoftmaxCrossEntropy(), _normal(2, 16), _labels(2),
    ),
    "dense-sequence-no-bias/bce": (
        fbp.Sequential([fbp.Dense(7, use_bias=False), fbp.Sigmoid(), fbp.Dense(1)]), fbp.BinaryCrossEntropy(),
        _normal(4, 5), lambda key, dtype: jax.random.bernoulli(key, 0.5, (BATCH, 4, 1)).astype(dtype),
    ),
    "conv": (
        fbp.Sequential([
            fbp.Conv2D(3, 3), fbp.ReLU(), fbp.MaxPool2D(2, stride=1),
            fbp.Conv2D(4, 2, stride=2, padding="VALID"), fbp.Tanh(), fbp.AvgPool2D(2, stride=1),
            fbp.Flatten(), fbp.Dense(3),
        ]),
        fbp.SoftmaxCrossEntropy(), _normal(8, 8, 2), _labels(),
    ),
    # two images per example: (B, 2, H, W, C) -> (B, 2, classes)
    "conv-two-images": (
        fbp.Sequential([fbp.Conv2D(2, 3, stride=2), fbp.ReLU(), fbp.Flatten(), fbp.Dense(3)]),
        fbp.SoftmaxCrossEntropy(), _normal(2, 7, 7, 1), _labels(2),
    ),
    # Conv2D's per_example_backward, both forms of the mixed rule (Bu et al. 2022): the first layer forms
    # per-example gradients (2 T^2 > p d), from patches (one input channel); the second the Gram form
    "conv-patches-then-gram": (
        fbp.Sequential([
            fbp.Conv2D(8, 3), fbp.ReLU(), fbp.MaxPool2D(2), fbp.Conv2D(8, 3), fbp.Tanh(), fbp.Flatten(), fbp.Dense(3),
        ]),
        fbp.SoftmaxCrossEntropy(), _normal(6, 6, 1), _labels(),
    ),
    # Conv1D, the Gram form in both layers (the second strided)
    "conv1d-gram": (
        fbp.Sequential([fbp.Conv1D(6, 3), fbp.ReLU(), fbp.Conv1D(4, 2, stride=2), fbp.Flatten(num_axes=2), fbp.Dense(3)]),
        fbp.SoftmaxCrossEntropy(), _normal(6, 4), _labels(),
    ),
    "layernorm-residual": (
        fbp.Sequential([
            fbp.Dense(6), fbp.Residual(fbp.Sequential([fbp.LayerNorm(), fbp.Dense(8), fbp.GELU(), fbp.Dense(6)])),
            fbp.Dense(3),
        ]),
        fbp.SoftmaxCrossEntropy(), _normal(5), _labels(),
    ),
    # a small vocabulary, so ids repeat within an example (rows of dW add up)
    "embedding": (
        fbp.Sequential([fbp.Embedding(4, 3), fbp.Flatten(num_axes=2), fbp.Dense(3)]),
        fbp.SoftmaxCrossEntropy(), _ids(6, vocabulary=4), _labels(),
    ),
    "embedding-one-id": (
        fbp.Sequential([fbp.Embedding(7, 3), fbp.Dense(2)]), fbp.MSE(), _ids(vocabulary=7), _normal(2),
    ),
    "embedding-sequence": (
        fbp.Sequential([fbp.Embedding(5, 4), fbp.Residual(fbp.Sequential([fbp.LayerNorm(), fbp.Dense(4)])),
                        fbp.Dense(3)]),
        fbp.SoftmaxCrossEntropy(), _ids(5, vocabulary=5), _labels(5),
    ),
    "dropout-without-key": (
        fbp.Sequential([fbp.Dense(6), fbp.Dropout(0.3), fbp.Dense(3)]), fbp.SoftmaxCrossEntropy(), _normal(5),
        _labels(),
    ),
}


def _example(name, dtype, seed=0):
    """``(model, loss, params, x, y)`` with params, x and y drawn in one jitted call (fast to set up)."""
    model, loss, make_x, make_y = MODELS[name]

    def draw(key):
        key_x, key_y, key_params = jax.random.split(key, 3)
        x, y = make_x(key_x, dtype), make_y(key_y, dtype)
        params = model.init(key_params, x)
        if jnp.issubdtype(x.dtype, jnp.integer):  # Embedding tables follow their own dtype field
            params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
        return params, x, y

    return model, loss, *jax.jit(draw)(jax.random.PRNGKey(seed))


def _assert_close(actual, expected, dtype):
    chex.assert_trees_all_close(actual, expected, **TOLERANCE[jnp.dtype(dtype).name])


CLIP_NORMS = (0.05, 1.0, 1e6)  # clip every example, some, none


def _all_paths(model, loss):
    """One jitted function for every path of a model, so each case compiles once."""

    def paths(params, x, y):
        pred, cache = model.forward(params, x, key=None)
        dpred = jax.vmap(lambda p, t: loss.backward(loss.forward(p, t)[1]))(pred, y)
        out = {
            "averaged": fbp.value_and_grad(model, loss, per_example=True)(params, x, y),
            "averaged (vmap)": fbp.value_and_grad(model, loss, per_example="vmap")(params, x, y),
            "sq_norms": model.per_example_sq_norms(params, cache, dpred),
        }
        # the bound may be traced: one program for all of them
        bounds = jnp.asarray(CLIP_NORMS, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else pred.dtype)
        for per_example in (True, "vmap"):
            clipped = functools.partial(clipped_value_and_grad, model, loss, per_example=per_example)
            out[f"clipped {per_example}"] = jax.vmap(lambda c, clipped=clipped: clipped(c)(params, x, y))(bounds)
        return out

    return jax.jit(paths)


@pytest.mark.parametrize("name", MODELS)
def test_fast_paths_equal_vmap(name, dtype):
    """Averaged, per-example norms and ghost clipping (three bounds) against the vmap reference."""
    model, loss, params, x, y = _example(name, dtype)
    out = _all_paths(model, loss)(params, x, y)
    _assert_close(out["averaged"], out["averaged (vmap)"], dtype)
    _, _, vmap_norms = out["clipped vmap"]  # from the materialised per-example gradients
    _assert_close(out["sq_norms"], vmap_norms[0] ** 2, dtype)
    _assert_close(out["clipped True"], out["clipped vmap"], dtype)


@pytest.mark.parametrize("name", ["conv-two-images", "embedding-sequence"])
@pytest.mark.parametrize("grad", ["custom_vjp", "autodiff"])
def test_averaged_equals_vmap_other_grad_modes(name, grad, x64):
    model, loss, params, x, y = _example(name, jnp.float64)

    def both(params, x, y):
        fast = fbp.value_and_grad(model, loss, grad=grad, per_example=True)(params, x, y)
        return fast, fbp.value_and_grad(model, loss, grad=grad, per_example="vmap")(params, x, y)

    fast, reference = jax.jit(both)(params, x, y)
    _assert_close(fast, reference, jnp.float64)


def test_ghost_clipping_bounds_each_example(x64):
    """Clipping to C then averaging: the mean gradient has norm <= C."""
    model, loss, params, x, y = _example("dense-sequence", jnp.float64)
    _, grads, norms = jax.jit(clipped_value_and_grad(model, loss, 0.01))(params, x, y)
    assert bool(jnp.all(norms > 0.01))
    assert float(optax.tree.norm(grads)) <= 0.01 * (1 + 1e-12)


def test_per_example_grads_are_stacked(x64):
    model, loss, params, x, y = _example("dense-sequence", jnp.float64)
    grads = jax.jit(fbp.per_example_grads(model, loss))(params, x, y)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
        assert g.shape == (BATCH, *p.shape)
    # example 2 alone, as a batch of one, has the same gradient
    _, alone = jax.jit(fbp.value_and_grad(model, loss))(params, x[2:3], y[2:3])
    _assert_close(jax.tree_util.tree_map(lambda g: g[2], grads), alone, jnp.float64)


def test_dropout_with_key_keeps_vmap_keys(x64):
    """With a key, example i draws fold_in(key, i) as under vmap: the fast path steps aside."""
    model = fbp.Sequential([fbp.Dense(6), fbp.Dropout(0.5), fbp.Dense(3)])
    loss = fbp.SoftmaxCrossEntropy()
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 4), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(1), (BATCH,), 0, 3)
    params = model.init(jax.random.PRNGKey(2), x)
    key = jax.random.PRNGKey(3)

    def paths(params, x, y, key):
        stacked = fbp.per_example_grads(model, loss)(params, x, y, key)
        _, averaged = fbp.value_and_grad(model, loss, per_example=True)(params, x, y, key)
        _, clipped, _ = clipped_value_and_grad(model, loss, 0.1)(params, x, y, key)
        return stacked, averaged, clipped

    stacked, averaged, clipped = jax.jit(paths)(params, x, y, key)
    _assert_close(averaged, jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked), jnp.float64)
    _assert_close(clipped, clip_and_average(stacked, 0.1)[0], jnp.float64)


@pytest.mark.parametrize("steps, n_in, n_out", [(1, 3, 4), (2, 16, 32), (6, 3, 4)])  # product, Gram, matrix
def test_outer_sq_norms_all_forms(steps, n_in, n_out, x64):
    a = jax.random.normal(jax.random.PRNGKey(0), (BATCH, steps, n_in), jnp.float64)
    b = jax.random.normal(jax.random.PRNGKey(1), (BATCH, steps, n_out), jnp.float64)
    expected = np.sum(np.einsum("bti,bto->bio", np.asarray(a), np.asarray(b)) ** 2, axis=(1, 2))
    np.testing.assert_allclose(per_example_outer_sq_norms(a, b), expected, rtol=1e-12)


def test_train_step_clipping_and_noise_equal_vmap(x64):
    """The DP-SGD step, ghost clipping against vmap: same params, metrics and noise."""
    model, loss, params, x, y = _example("dense", jnp.float64)
    optimizer = optax.sgd(0.1)
    results = []
    for per_example in (True, "vmap"):
        step = fbp.make_train_step(
            model, loss, optimizer, per_example=per_example, clip_norm=0.5, noise_multiplier=1.0, donate=False
        )
        state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(7))
        results.append(step(state, x, y))
    _assert_close(results[0], results[1], jnp.float64)
    assert 0.0 < float(results[0][1]["clipped_fraction"]) <= 1.0


def test_fast_path_holds_no_per_example_gradients():
    """Temp memory of the averaged and clipped steps stays far below B copies of the params."""
    batch = 64
    model = fbp.Sequential([fbp.Dense(256), fbp.ReLU(), fbp.Dense(10)])
    loss = fbp.SoftmaxCrossEntropy()
    x = jnp.ones((batch, 128))
    y = jnp.zeros((batch,), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x)
    per_example_bytes = batch * sum(p.size for p in jax.tree_util.tree_leaves(params)) * 4

    def temp(f):
        stats = jax.jit(f).lower(params, x, y).compile().memory_analysis()
        if stats is None:
            pytest.skip("no memory analysis on this backend")
        return stats.temp_size_in_bytes

    assert temp(fbp.value_and_grad(model, loss, per_example=True)) < per_example_bytes / 8
    assert temp(clipped_value_and_grad(model, loss, 1.0)) < per_example_bytes / 8


def test_bad_per_example_values():
    model, loss = MODELS["dense"][:2]
    with pytest.raises(ValueError, match="per_example must be one of"):
        fbp.value_and_grad(model, loss, per_example="fast")
    with pytest.raises(ValueError, match="per_example must be one of"):
        fbp.value_and_grad(model, loss, per_example=1)
    with pytest.raises(ValueError, match="clipping needs per-example gradients"):
        clipped_value_and_grad(model, loss, 1.0, per_example=False)
