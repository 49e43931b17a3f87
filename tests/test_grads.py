"""value_and_grad's three grad modes, per-example gradients, and with_manual_vjp, on zoo models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import ScaledBackward, array

import fbp
from fbp.zoo import ZOO

pytestmark = pytest.mark.usefixtures("x64")

# one model of each kind: dense + dropout + log-softmax, conv + pools, embedding (residual and
# LayerNorm: test_layers.py and the CLI zoo check)
MODELS = ["mlp-log-softmax/cross-entropy", "cnn/cross-entropy", "embedding/cross-entropy"]

# float64, O(1) values: the manual backward and autodiff sum the same terms in different
# orders, ~1e-15 apart; 1e-12 leaves a wide margin and still fails any wrong formula
TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}


def _example(name, seed=0):
    return ZOO[name].example(seed=seed, dtype=jnp.float64)


@pytest.mark.parametrize("name", MODELS)
def test_manual_equals_autodiff_equals_custom_vjp(name):
    """custom_vjp is jax.grad through with_manual_vjp: it must give the manual gradient."""
    model, loss, params, x, y = _example(name)
    results = {grad: jax.jit(fbp.value_and_grad(model, loss, grad=grad))(params, x, y) for grad in fbp.grads.GRAD_MODES}
    value, grads = results["manual"]
    for grad in ("autodiff", "custom_vjp"):
        other_value, other_grads = results[grad]
        np.testing.assert_allclose(other_value, value, **TOLERANCE)
        chex.assert_trees_all_close(other_grads, grads, **TOLERANCE)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)


@pytest.mark.parametrize("name", MODELS)
def test_per_example_average_equals_batch_gradient(name):
    model, loss, params, x, y = _example(name)
    value, grads = jax.jit(fbp.value_and_grad(model, loss))(params, x, y)
    pe_value, pe_grads = jax.jit(fbp.value_and_grad(model, loss, per_example=True))(params, x, y)
    np.testing.assert_allclose(pe_value, value, **TOLERANCE)
    chex.assert_trees_all_close(pe_grads, grads, **TOLERANCE)

    values, stacked = jax.jit(fbp.per_example_value_and_grad(model, loss))(params, x, y)
    chex.assert_trees_all_equal(jax.jit(fbp.per_example_grads(model, loss))(params, x, y), stacked)
    batch = x.shape[0]
    assert values.shape == (batch,)
    chex.assert_trees_all_equal_shapes(stacked, jax.tree_util.tree_map(lambda p: jnp.stack([p] * batch), params))
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked), grads, **TOLERANCE)
    # example 0's gradient is the gradient of example 0's loss alone
    value_0, grads_0 = jax.jit(fbp.value_and_grad(model, loss))(params, x[:1], y[:1])
    np.testing.assert_allclose(values[0], value_0, **TOLERANCE)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: g[0], stacked), grads_0, **TOLERANCE)


def test_with_manual_vjp_really_calls_the_hand_written_backward():
    """A backward deliberately scaled by 3 shows up in jax.grad through with_manual_vjp, not in autodiff."""
    factor = 3.0
    model = fbp.Sequential([ScaledBackward(fbp.Dense(4), factor), fbp.Tanh(), fbp.Dense(2)])
    rng = np.random.default_rng(0)
    x, y = array(rng.standard_normal((5, 3)), np.float64), array(rng.standard_normal((5, 2)), np.float64)
    params = model.init(jax.random.PRNGKey(0), x)
    loss = fbp.MSE()
    apply = fbp.with_manual_vjp(model)

    dparams, dx = jax.jit(jax.grad(lambda p, x: loss(apply(p, x), y), argnums=(0, 1)))(params, x)
    ref_dparams, ref_dx = jax.jit(jax.grad(lambda p, x: loss(model.apply(p, x), y), argnums=(0, 1)))(params, x)

    chex.assert_trees_all_close(dparams[0], jax.tree_util.tree_map(lambda g: factor * g, ref_dparams[0]), **TOLERANCE)
    chex.assert_trees_all_close(dparams[2], ref_dparams[2], **TOLERANCE)  # layers after it are untouched
    np.testing.assert_allclose(dx, factor * ref_dx, **TOLERANCE)
    _, custom = jax.jit(fbp.value_and_grad(model, loss, grad="custom_vjp"))(params, x, y)
    chex.assert_trees_all_close(custom, dparams, **TOLERANCE)


def test_dropout_key_is_shared_by_all_modes_and_folded_per_example():
    model, loss, params, x, y = _example("mlp-log-softmax/cross-entropy")  # has Dropout(0.2)
    key = jax.random.PRNGKey(7)
    results = {grad: jax.jit(fbp.value_and_grad(model, loss, grad=grad))(params, x, y, key) for grad in fbp.grads.GRAD_MODES}
    value, grads = results["manual"]
    for grad in ("autodiff", "custom_vjp"):
        np.testing.assert_allclose(results[grad][0], value, **TOLERANCE)
        chex.assert_trees_all_close(results[grad][1], grads, **TOLERANCE)
    no_dropout_value = jax.jit(loss)(jax.jit(model.apply)(params, x), y)
    assert not np.isclose(value, no_dropout_value)  # the key really switched dropout on

    # example i gets the key fold_in(key, i)
    values, stacked = jax.jit(fbp.per_example_value_and_grad(model, loss))(params, x, y, key)
    value_1, grads_1 = jax.jit(fbp.value_and_grad(model, loss))(params, x[1], y[1], jax.random.fold_in(key, 1))
    np.testing.assert_allclose(values[1], value_1, **TOLERANCE)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: g[1], stacked), grads_1, **TOLERANCE)


def test_unknown_grad_mode_is_a_value_error():
    model, loss = ZOO["mlp-tanh/mse"].model, ZOO["mlp-tanh/mse"].loss
    for make in (fbp.value_and_grad, fbp.per_example_grads, fbp.per_example_value_and_grad):
        with pytest.raises(ValueError, match=r"grad must be one of .*'manual'.*got 'backprop'"):
            make(model, loss, grad="backprop")


def test_mode_keyword_is_deprecated_for_grad():
    """``mode=`` (fbp < 0.2.0) still works for one release, with a DeprecationWarning naming ``grad=``."""
    model, loss, params, x, y = _example("mlp-tanh/mse")
    _, expected = fbp.value_and_grad(model, loss, grad="autodiff")(params, x, y)
    for make in (fbp.value_and_grad, fbp.per_example_grads, fbp.per_example_value_and_grad):
        with pytest.warns(DeprecationWarning, match="pass grad='autodiff'"):
            make(model, loss, mode="autodiff")
    with pytest.warns(DeprecationWarning):
        _, grads = fbp.value_and_grad(model, loss, mode="autodiff")(params, x, y)
    chex.assert_trees_all_close(grads, expected, **TOLERANCE)
    with pytest.raises(ValueError, match="pass grad= only"), pytest.warns(DeprecationWarning):
        fbp.value_and_grad(model, loss, grad="custom_vjp", mode="autodiff")
