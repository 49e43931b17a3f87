"""DP-SGD as fbp runs it: masked (padded) examples contribute nothing, and the Poisson normalisation.

A Poisson-sampled batch is padded to a static size with masked rows (``fbp.data.poisson_batches``).
A masked row must change nothing, bit for bit: not the gradient, the norms, the loss or the
counts; and DP-SGD divides the noisy clipped sum by the EXPECTED batch size q N (``normalize_by``),
not by the number drawn, as the accountant assumes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp.grads import clipped_value_and_grad

BATCH = 6
MASK = np.array([True, False, True, True, False, True])

MODELS = {
    "mlp": (fbp.Sequential([fbp.Dense(5), fbp.Tanh(), fbp.Dense(3)]), (4,)),
    "cnn": (fbp.Sequential([fbp.Conv2D(3, 3), fbp.ReLU(), fbp.MaxPool2D(2), fbp.Flatten(), fbp.Dense(3)]), (6, 6, 1)),
}


def _data(name, seed=0, dtype=jnp.float32):
    model, shape = MODELS[name]
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (BATCH, *shape), dtype)
    y = jax.random.randint(ky, (BATCH,), 0, 3)
    return model, model.init(kp, x), x, y


def _scramble(x, y, mask, fill=None):
    """x and y with every masked row replaced: by ``fill`` (e.g. NaN), or by other random values."""
    keep = jnp.asarray(mask).reshape(-1, *([1] * (x.ndim - 1)))
    other = jnp.full_like(x, fill) if fill is not None else 100 * jax.random.normal(jax.random.PRNGKey(9), x.shape)
    return jnp.where(keep, x, other), jnp.where(jnp.asarray(mask), y, (y + 1) % 3)


def _functions(model, loss):
    """Every gradient function that takes a mask, by name: f(params, x, y, mask) -> a pytree."""
    fs = {
        f"value_and_grad per_example={p!r}": fbp.value_and_grad(model, loss, per_example=p)
        for p in (False, True, "vmap")
    }
    for p in (True, "vmap"):
        fs[f"clipped per_example={p!r}"] = clipped_value_and_grad(model, loss, 0.5, per_example=p)
        fs[f"clipped per_example={p!r} normalize_by=4"] = clipped_value_and_grad(
            model, loss, 0.5, per_example=p, normalize_by=4.0
        )
    return {name: jax.jit(lambda params, x, y, mask, f=f: f(params, x, y, mask=mask)) for name, f in fs.items()}


@pytest.mark.parametrize("name", MODELS)
def test_masked_examples_change_nothing_bit_for_bit(name):
    """Changing a masked example's x and y (to other values, or to NaN) leaves every output identical."""
    model, params, x, y = _data(name)
    loss = fbp.SoftmaxCrossEntropy()
    for label, f in _functions(model, loss).items():
        reference = f(params, x, y, MASK)
        for fill in (None, jnp.nan):
            changed = f(params, *_scramble(x, y, MASK, fill), MASK)
            for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(changed)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{label}, masked rows = {fill}")


@pytest.mark.parametrize("name", MODELS)
def test_masked_batch_equals_the_real_examples_alone(name, x64):
    """The masked mean (or the clipped sum / normalize_by) equals the computation on the real examples only."""
    model, params, x, y = _data(name, dtype=jnp.float64)
    loss = fbp.SoftmaxCrossEntropy()
    real_x, real_y = x[MASK], y[MASK]
    tolerance = {"rtol": 1e-10, "atol": 1e-13}
    for per_example in (False, True, "vmap"):
        f = jax.jit(fbp.value_and_grad(model, loss, per_example=per_example))
        (value, grads), (real_value, real_grads) = f(params, x, y, mask=MASK), f(params, real_x, real_y)
        np.testing.assert_allclose(value, real_value, **tolerance)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(real_grads)):
            np.testing.assert_allclose(a, b, **tolerance)
    for per_example in (True, "vmap"):
        masked = jax.jit(clipped_value_and_grad(model, loss, 0.5, per_example=per_example, normalize_by=3.0))
        alone = jax.jit(clipped_value_and_grad(model, loss, 0.5, per_example=per_example))
        value, grads, norms = masked(params, x, y, mask=MASK)
        real_value, real_mean, real_norms = alone(params, real_x, real_y)
        count = int(MASK.sum())
        np.testing.assert_allclose(value, real_value, **tolerance)
        np.testing.assert_allclose(norms[MASK], real_norms, **tolerance)
        np.testing.assert_array_equal(norms[~MASK], 0.0)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(real_mean)):
            np.testing.assert_allclose(a, b * count / 3.0, **tolerance)  # the sum over real examples, / 3


def test_all_masked_batch_is_zero_not_nan():
    model, params, x, y = _data("mlp")
    loss = fbp.SoftmaxCrossEntropy()
    nothing = np.zeros(BATCH, bool)
    for f in _functions(model, loss).values():
        for leaf in jax.tree_util.tree_leaves(f(params, x, y, nothing)):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_mask_none_is_the_unmasked_path():
    """No mask and an all-True mask agree; no mask is exactly the call without the argument."""
    model, params, x, y = _data("mlp")
    loss = fbp.SoftmaxCrossEntropy()
    f = jax.jit(clipped_value_and_grad(model, loss, 0.5))
    g = jax.jit(lambda params, x, y: clipped_value_and_grad(model, loss, 0.5)(params, x, y, mask=None))
    for a, b in zip(jax.tree_util.tree_leaves(f(params, x, y)), jax.tree_util.tree_leaves(g(params, x, y))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    everyone = clipped_value_and_grad(model, loss, 0.5)(params, x, y, mask=np.ones(BATCH, bool))
    for a, b in zip(jax.tree_util.tree_leaves(f(params, x, y)), jax.tree_util.tree_leaves(everyone)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_mask_and_normalize_by():
    model, params, x, y = _data("mlp")
    loss = fbp.SoftmaxCrossEntropy()
    f = clipped_value_and_grad(model, loss, 0.5)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch,\)"):
        f(params, x, y, mask=np.ones((BATCH, 1), bool))
    with pytest.raises(TypeError, match="mask must be"):
        f(params, x, y, mask=[True] * BATCH)
    with pytest.raises(ValueError, match="normalize_by must be a positive number"):
        clipped_value_and_grad(model, loss, 0.5, normalize_by=0)


# sequence models for the JAX-Privacy comparison: (model, x shape, y shape without the batch)
SEQUENCE_MODELS = {
    "gru": (fbp.Sequential([fbp.GRU(4, return_sequences=False), fbp.Dense(3)]), (5, 3), ()),
    "attention": (fbp.Sequential([fbp.MultiHeadAttention(2, causal=True), fbp.Dense(3)]), (6, 8), (6,)),
}


def _sequence_data(name, dtype):
    model, x_shape, y_shape = SEQUENCE_MODELS[name]
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (BATCH, *x_shape), dtype)
    return model, model.init(kp, x), x, jax.random.randint(ky, (BATCH, *y_shape), 0, 3)


@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")  # inside JAX-Privacy
@pytest.mark.parametrize("name", [*MODELS, *SEQUENCE_MODELS])
def test_jax_privacy_clipped_grad_equals_fbp(name, x64):
    """JAX-Privacy's ``clipped_grad`` (vmap of per-example jax.grad, then clip and sum) on the same model and
    batch gives fbp's clipped gradient (ghost clipping through the hand-written backward) and norms."""
    jax_privacy = pytest.importorskip("jax_privacy", reason="JAX-Privacy is not installed (pip install jax-privacy)")
    data = _data if name in MODELS else _sequence_data
    model, params, x, y = data(name, dtype=jnp.float64)
    loss = fbp.SoftmaxCrossEntropy()
    theirs = jax_privacy.clipped_grad(
        lambda params, x, y: loss(model.apply(params, x), y),
        l2_clip_norm=0.5, batch_argnums=(1, 2), normalize_by=float(BATCH), return_grad_norms=True,
    )
    their_grads, aux = jax.jit(theirs)(params, x, y)
    _, our_grads, our_norms = jax.jit(clipped_value_and_grad(model, loss, 0.5))(params, x, y)
    np.testing.assert_allclose(our_norms, aux.grad_norms, rtol=1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(our_grads), jax.tree_util.tree_leaves(their_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def _dp_step(model, **options):
    import optax

    optimizer = optax.sgd(0.1)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, per_example=True, clip_norm=0.5,
                               donate=False, **options)
    return step, optimizer


@pytest.mark.parametrize("name", MODELS)
def test_train_step_with_mask_ignores_masked_rows(name):
    """The DP-SGD step (noise, Poisson normalisation): a masked row's x and y change no output, bit for bit."""
    model, params, x, y = _data(name)
    step, optimizer = _dp_step(model, noise_multiplier=1.0, normalize_by=4.0)
    state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(3))
    reference = step(state, x, y, MASK)
    changed = step(state, *_scramble(x, y, MASK, jnp.nan), MASK)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(changed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    metrics = reference[1]
    assert int(metrics["examples"]) == MASK.sum()
    assert 0.0 <= float(metrics["clipped_fraction"]) <= 1.0


def test_train_step_noise_is_scaled_by_normalize_by(x64):
    """Noisy clipped sum / normalize_by: the update is (sum of clipped g_i + sigma C z) / normalize_by, so the
    noise part alone (all examples masked) has standard deviation sigma C / normalize_by per coordinate."""
    model = fbp.Sequential([fbp.Dense(400)])
    x = jnp.ones((4, 50), jnp.float64)
    y = jnp.zeros((4, 400), jnp.float64)
    params = model.init(jax.random.PRNGKey(0), x)
    import optax

    optimizer = optax.sgd(1.0)
    step = fbp.make_train_step(model, fbp.MSE(), optimizer, per_example=True, clip_norm=2.0, noise_multiplier=3.0,
                               normalize_by=5.0, donate=False, skip_nonfinite=False)
    state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(1))
    new, metrics = step(state, x, y, np.zeros(4, bool))
    noise = np.asarray(params[0]["W"] - new.params[0]["W"]).ravel()  # sgd(1): the update is -grads
    assert int(metrics["examples"]) == 0 and float(metrics["loss"]) == 0.0
    np.testing.assert_allclose(noise.std(), 3.0 * 2.0 / 5.0, rtol=0.05)  # 20,000 draws: about 0.5% error


@pytest.mark.optimized  # bit for bit in the program users run
@pytest.mark.parametrize("strategy", ["scan", "loop"])
def test_train_epoch_with_masks_equals_steps(strategy):
    """train_epoch over masked batches is the step called on each batch in turn, bit for bit."""
    model, params, x, y = _data("mlp")
    step, optimizer = _dp_step(model, noise_multiplier=1.0, normalize_by=4.0)
    xs, ys = jnp.stack([x, x[::-1], x]), jnp.stack([y, y[::-1], y])
    masks = np.stack([MASK, MASK[::-1], np.ones(BATCH, bool)])
    state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(3))
    by_hand = state
    for i in range(3):
        by_hand, _ = step(by_hand, xs[i], ys[i], masks[i])
    epoch, metrics = fbp.train_epoch(step, state, xs, ys, masks=masks, strategy=strategy)
    for a, b in zip(jax.tree_util.tree_leaves(by_hand), jax.tree_util.tree_leaves(epoch)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(metrics["examples"], masks.sum(axis=1))


# --- fit / fbp train: the DP path --------------------------------------------------------------------

def _dp_config(out, **changes):
    from fbp.training.fit import TrainConfig

    base = TrainConfig(model="mlp:16", lr=0.01, epochs=3, batch_size=64, quiet=True, per_example=True,
                       clip_norm=1.0, target_epsilon=2.0, out=str(out))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """Three epochs of DP-SGD on digits to epsilon 2 (Poisson sampling, the default), and what it printed."""
    from fbp.training.fit import fit

    out = tmp_path_factory.mktemp("dp")
    printed = []
    return fit(_dp_config(out), log=printed.append), printed


def test_dp_fit_reports_epsilon_everywhere(dp_run):
    from fbp import privacy

    result, printed = dp_run
    out = result.out_dir
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    written = json.loads((out / "config.json").read_text())["privacy"]
    n, steps = 1438, 3 * (1438 // 64)
    assert written["sampling"] == "poisson" and written["steps"] == steps and written["delta"] == 1e-4
    assert written["sampling_rate"] == 64 / n and written["max_batch_size"] > 64
    sigma = written["noise_multiplier"]
    assert sigma == pytest.approx(privacy.noise_multiplier_for_epsilon(2.0, 64 / n, steps, 1e-4))
    assert written["epsilon"] <= 2.0 and written["epsilon"] == pytest.approx(2.0, rel=1e-3)  # calibrated
    epsilons = [line["epsilon"] for line in lines]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(written["epsilon"])
    assert epsilons[0] == pytest.approx(privacy.epsilon(sigma, 64 / n, steps // 3, 1e-4))
    assert "Poisson sampling" in printed[0] and "delta 0.0001 (the default" in printed[0]
    assert "epsilon 2" in printed[-1] or "epsilon 1.99" in printed[-1]
    assert lines[-1]["test_accuracy"] > 0.3  # it learns something


def test_dp_fit_resumes_bit_identically(dp_run, tmp_path):
    """A DP run resumed from its first checkpoint (Poisson batches, calibrated noise) ends where the uninterrupted
    run ended: same parameters, optimizer state, step and key, bit for bit."""
    from fbp.training import checkpoint
    from fbp.training.fit import fit

    result, _ = dp_run
    folder = tmp_path / "run"
    shutil.copytree(result.out_dir, folder)
    for epoch, path in checkpoint.list_checkpoints(folder / "checkpoints"):
        if epoch > 1:
            shutil.rmtree(path)  # as if killed after epoch 1
    resumed = fit(_dp_config(folder, resume=True))
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(result.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [line["epsilon"] for line in resumed.history] == [line["epsilon"] for line in result.history]


def test_dp_fit_with_shuffled_batches_says_what_its_epsilon_means(tmp_path):
    from fbp.training.fit import fit

    printed = []
    result = fit(_dp_config(tmp_path, epochs=1, target_epsilon=None, noise_multiplier=1.0, sampling="shuffle"),
                 log=printed.append)
    assert "the accountant's guarantee assumes Poisson sampling" in printed[0]
    assert json.loads((result.out_dir / "config.json").read_text())["privacy"]["max_batch_size"] is None
    assert result.history[0]["epsilon"] > 0
