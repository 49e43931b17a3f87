"""Every registered layer: backward against jax.vjp, forward against a numpy formula.

One parametrized test over the registry x dtypes x input shapes x (eager, jit).
Every dtype and input shape runs under jit; eager runs in float32 on the
two-leading-axes shape only, since eager dispatch compiles each primitive for
each shape and dtype (about a second per case on a 2-core CPU) and what eager
adds over jit (concrete arrays instead of tracers) depends on neither.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import (
    ALL_CASES,
    CASES,
    LEADS,
    WrongTanh,
    array,
    call_apply,
    call_forward,
    float_dtype_tolerance,
    make_params,
    public_layer_classes,
    reference_forward,
)

import fbp

pytestmark = pytest.mark.usefixtures("fast_compile")

# layers are frozen dataclasses, hence hashable: static under jit
WRAPPERS = {"eager": lambda f: f, "jit": lambda f: jax.jit(f, static_argnums=0)}
GRID = [
    pytest.param(dtype, lead, WRAPPERS["jit"], id=f"{dtype}-{name}-jit")
    for dtype in ("float32", "float64")
    for name, lead in LEADS.items()
] + [pytest.param("float32", LEADS["lead2x3"], WRAPPERS["eager"], id="float32-lead2x3-eager")]


def test_every_public_layer_has_a_case():
    assert set(CASES) == public_layer_classes()


def _forward_backward_and_vjp(layer, params, x, dy, key):
    """The layer's forward and hand-written backward, and jax.vjp of its apply on the same input."""
    y, cache = call_forward(layer, params, x, key)
    dparams, dx = layer.backward(params, cache, dy)
    if jnp.issubdtype(x.dtype, jnp.integer):  # ids are not differentiable: vjp w.r.t. params only
        y_apply, vjp = jax.vjp(lambda p: call_apply(layer, p, x, key), params)
        (ref_dparams,), ref_dx = vjp(dy), None
    else:
        y_apply, vjp = jax.vjp(lambda p, x: call_apply(layer, p, x, key), params, x)
        ref_dparams, ref_dx = vjp(dy)
    return y, y_apply, dparams, dx, ref_dparams, ref_dx


@pytest.mark.parametrize(("dtype", "lead", "wrap"), GRID, indirect=["dtype"])
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.name)
def test_layer(case, lead, dtype, wrap):
    rng = np.random.default_rng(0)
    layer, layer_key = case.layer, case.layer_key()
    x = case.make_input(rng, lead, dtype)
    params = make_params(layer, x, rng, dtype)
    y_shape = jax.eval_shape(lambda p, x: call_apply(layer, p, x, layer_key), params, x)
    dy = array(rng.standard_normal(y_shape.shape), dtype)

    run = wrap(_forward_backward_and_vjp)
    y, y_apply, dparams, dx, ref_dparams, ref_dx = run(layer, params, x, dy, layer_key)

    tolerance = float_dtype_tolerance(dtype)
    # forward: against the numpy formula, and apply == forward
    assert y.dtype == dtype
    np.testing.assert_allclose(y, reference_forward(layer, params, x, layer_key), **tolerance)
    chex.assert_trees_all_close(y_apply, y, **tolerance)
    # backward: against jax.vjp, leaf by leaf; parameter gradients summed over every leading axis
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    chex.assert_trees_all_close(dparams, ref_dparams, **tolerance)
    if case.vocabulary is not None:
        assert dx is None
    else:
        assert dx.shape == x.shape and dx.dtype == x.dtype
        chex.assert_trees_all_close(dx, ref_dx, **tolerance)


def test_dropout_key_changes_the_mask_and_no_key_is_identity():
    layer = fbp.Dropout(0.5)
    x = jnp.ones((64,))
    y1 = layer.apply({}, x, key=jax.random.PRNGKey(0))
    y2 = layer.apply({}, x, key=jax.random.PRNGKey(1))
    assert not np.array_equal(y1, y2)
    assert set(np.unique(y1)) <= {0.0, 2.0}  # kept units are scaled by 1 / (1 - rate)
    np.testing.assert_array_equal(layer.apply({}, x), x)


def test_the_comparison_catches_a_planted_bug():
    """Tanh with dx = dy (1 - y) instead of dy (1 - y^2) must fail the backward comparison."""
    x = array(np.linspace(-2, 2, 6), jnp.float32)
    *_, dx, _, ref_dx = jax.jit(_forward_backward_and_vjp, static_argnums=0)(WrongTanh(), {}, x, jnp.ones_like(x), None)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(dx, ref_dx, **float_dtype_tolerance(jnp.float32))
