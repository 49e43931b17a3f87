"""Every registered loss: value against a numpy formula, backward against jax.grad.

Every dtype and input shape runs under jit; eager in float32 on the two-leading-axes
shape only (as in test_layers.py: eager compiles each primitive for each shape).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import ALL_LOSS_CASES, LEADS, LOSS_CASES, NUM_CLASSES, array, float_dtype_tolerance

import fbp

GRID = [
    pytest.param(dtype, lead, jax.jit, id=f"{dtype}-{name}-jit")
    for dtype in ("float32", "float64")
    for name, lead in LEADS.items()
] + [pytest.param("float32", LEADS["lead2x3"], lambda f: f, id="float32-lead2x3-eager")]


def test_every_loss_has_a_case():
    exported = {getattr(fbp, name) for name in fbp.__all__}
    assert set(LOSS_CASES) == set(fbp.losses.REGISTRY)
    assert set(fbp.losses.REGISTRY) <= exported


def _value_and_grads(loss, pred, target):
    value, cache = loss.forward(pred, target)
    ref_value, ref_dpred = jax.value_and_grad(loss)(pred, target)  # the reference: autodiff of __call__
    return value, loss.backward(cache), ref_value, ref_dpred


@pytest.mark.parametrize(("dtype", "lead", "wrap"), GRID, indirect=["dtype"])
@pytest.mark.parametrize("case", ALL_LOSS_CASES, ids=lambda case: case.name)
def test_loss(case, lead, dtype, wrap):
    rng = np.random.default_rng(0)
    pred = case.make_pred(rng, lead, dtype)
    target = case.make_target(rng, lead, dtype)

    value, dpred, ref_value, ref_dpred = wrap(lambda p, t: _value_and_grads(case.loss, p, t))(pred, target)

    tolerance = float_dtype_tolerance(dtype)
    assert value.shape == () and value.dtype == dtype
    np.testing.assert_allclose(value, case.reference(np.asarray(pred, np.float64), np.asarray(target)), **tolerance)
    np.testing.assert_allclose(ref_value, value, **tolerance)
    assert dpred.shape == pred.shape and dpred.dtype == dtype
    chex.assert_trees_all_close(dpred, ref_dpred, **tolerance)


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
def test_integer_labels_equal_one_hot_targets(lead, dtype):
    rng = np.random.default_rng(1)
    logits = array(rng.standard_normal((*lead, NUM_CLASSES)), dtype)
    labels = rng.integers(0, NUM_CLASSES, lead)
    one_hot = array(np.eye(NUM_CLASSES)[labels], dtype)
    loss = fbp.SoftmaxCrossEntropy()

    @jax.jit
    def both(logits, labels, one_hot):
        (value_labels, cache_labels), (value_one_hot, cache_one_hot) = (
            loss.forward(logits, labels), loss.forward(logits, one_hot)
        )
        return value_labels, value_one_hot, loss.backward(cache_labels), loss.backward(cache_one_hot)

    value_labels, value_one_hot, dlogits_labels, dlogits_one_hot = both(logits, array(labels, np.int64), one_hot)
    # the same arithmetic on the same numbers once the labels are one-hot: equal up to a few ulps
    tolerance = {"rtol": 4 * float(jnp.finfo(dtype).eps), "atol": 0}
    np.testing.assert_allclose(value_labels, value_one_hot, **tolerance)
    np.testing.assert_allclose(dlogits_labels, dlogits_one_hot, **tolerance)


@pytest.mark.parametrize("case", ALL_LOSS_CASES, ids=lambda case: case.name)
def test_call_and_single_examples(case):
    """``loss(pred, t)`` is forward's value; a single example is a batch of one, so the
    per-example losses average to the batch loss."""
    rng = np.random.default_rng(2)
    pred = case.make_pred(rng, (6,), jnp.float32)
    target = case.make_target(rng, (6,), jnp.float32)
    assert case.loss(pred, target) == case.loss.forward(pred, target)[0]
    singles = jax.vmap(case.loss)(pred, target)
    # float32 mean of six O(1) values against a differently ordered sum: a few ulps
    np.testing.assert_allclose(jnp.mean(singles), case.loss(pred, target), rtol=1e-6)
