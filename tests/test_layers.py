"""Every registered layer: backward against jax.vjp, forward against a numpy formula.

One parametrized test over the registry x dtypes x input shapes x (eager, jit).
float64, the tight check, runs every input shape under jit; float32 runs one
example and two leading axes (the shapes differ in code paths, not in dtype
handling, which both of these see). Eager runs once per layer class, in float32
on the two-leading-axes shape, since eager dispatch compiles each primitive for
each shape and dtype (about a second per case on a 2-core CPU) and what eager
adds over jit (concrete arrays instead of tracers) depends on neither, nor on
the layer's options.
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
    ParallelSum,
    WrongTanh,
    array,
    float_dtype_tolerance,
    make_params,
    public_layer_classes,
    reference_forward,
)

import fbp
from fbp.grads import clipped_value_and_grad
from fbp.layers.base import uses_key

# layers are frozen dataclasses, hence hashable: static under jit
WRAPPERS = {"eager": lambda f: f, "jit": lambda f: jax.jit(f, static_argnums=0)}
GRID = [
    pytest.param(dtype, lead, WRAPPERS["jit"], id=f"{dtype}-{name}-jit")
    for dtype in ("float32", "float64")
    for name, lead in LEADS.items()
    if dtype == "float64" or name in ("single", "lead2x3")
]
EAGER = pytest.param("float32", LEADS["lead2x3"], WRAPPERS["eager"], id="float32-lead2x3-eager")
# eager once per layer class: the first case of each; not TransformerBlock, whose every method is
# a Sequential's of layers that run eagerly here on their own (it costs 9 s eagerly)
_FIRST_OF_CLASS = [
    case for case in {type(case.layer): case for case in reversed(ALL_CASES)}.values()
    if not isinstance(case.layer, fbp.TransformerBlock)
]
CASE_GRID = [pytest.param(case, *grid.values, id=f"{case.name}-{grid.id}") for case in ALL_CASES for grid in GRID] + [
    pytest.param(case, *EAGER.values, id=f"{case.name}-{EAGER.id}") for case in ALL_CASES if case in _FIRST_OF_CLASS
]


def test_every_public_layer_has_a_case():
    assert set(CASES) == public_layer_classes()


def _forward_backward_and_vjp(layer, params, x, dy, key):
    """The layer's forward and hand-written backward, and jax.vjp of its apply on the same input."""
    y, cache = layer.forward(params, x, key=key)
    dparams, dx = layer.backward(params, cache, dy)
    if jnp.issubdtype(x.dtype, jnp.integer):  # ids are not differentiable: vjp w.r.t. params only
        y_apply, vjp = jax.vjp(lambda p: layer.apply(p, x, key=key), params)
        (ref_dparams,), ref_dx = vjp(dy), None
    else:
        y_apply, vjp = jax.vjp(lambda p, x: layer.apply(p, x, key=key), params, x)
        ref_dparams, ref_dx = vjp(dy)
    return y, y_apply, dparams, dx, ref_dparams, ref_dx


@pytest.mark.parametrize(("case", "dtype", "lead", "wrap"), CASE_GRID, indirect=["dtype"])
def test_layer(case, lead, dtype, wrap):
    rng = np.random.default_rng(0)
    layer, layer_key = case.layer, case.layer_key()
    x = case.make_input(rng, lead, dtype)
    params = make_params(layer, x, rng, dtype)
    y_shape = jax.eval_shape(lambda p, x: layer.apply(p, x, key=layer_key), params, x)
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


# --- a user-written combinator: the protocol alone must be enough ------------

# float64, O(1) values: paths that sum the same terms in other orders agree to ~1e-15
FLOAT64 = {"rtol": 1e-12, "atol": 1e-12}


def _with_user_combinator(right=None):
    """``(model, params, x, y)``: Dense, then ParallelSum(Dense + Dropout, right), then Dense; float64."""
    right = fbp.Tanh() if right is None else right
    model = fbp.Sequential(
        [fbp.Dense(4), ParallelSum(fbp.Sequential([fbp.Dense(4), fbp.Dropout(0.5)]), right), fbp.Dense(3)]
    )
    rng = np.random.default_rng(0)
    x = array(rng.standard_normal((5, 3)), np.float64)
    y = array(rng.integers(0, 3, (5,)), np.int32)
    return model, make_params(model, x, rng, np.float64), x, y


def test_user_combinator_children_apply_and_backward(x64):
    model, params, x, _ = _with_user_combinator()
    key = jax.random.PRNGKey(3)
    parallel = model.layers[1]
    assert isinstance(parallel, fbp.LayerProtocol) and not isinstance(parallel, fbp.Layer)

    # children: each sub-layer with its params, the input it sees and its share of the key
    outer = model.children(params, x, key=key)
    assert [c.path for c in outer] == ["[0]", "[1]", "[2]"]
    np.testing.assert_array_equal(outer[1].x, model.layers[0].apply(params[0], x))
    inner = parallel.children(outer[1].params, outer[1].x, key=outer[1].key)
    assert [c.path for c in inner] == [".left", ".right"] and inner[0].layer is parallel.left
    assert all(c.x is outer[1].x for c in inner)
    assert [c.key is None for c in parallel.children(outer[1].params, outer[1].x)] == [True, True]

    # forward == apply, and the hand-written backward against jax.vjp, with dropout on
    dy = array(np.random.default_rng(1).standard_normal((5, 3)), np.float64)
    y, y_apply, dparams, dx, ref_dparams, ref_dx = jax.jit(_forward_backward_and_vjp, static_argnums=0)(
        model, params, x, dy, key
    )
    assert not np.allclose(y, model.apply(params, x))  # the key reached the Dropout inside the branch
    chex.assert_trees_all_close(y_apply, y, **FLOAT64)
    chex.assert_trees_all_close(dparams, ref_dparams, **FLOAT64)
    chex.assert_trees_all_close(dx, ref_dx, **FLOAT64)
    # randomness is read from the trace: the dropout branch reads the key, a Tanh-only model does not
    assert uses_key(model, params, x)
    deterministic = ParallelSum(fbp.Dense(3), fbp.Tanh())
    assert not uses_key(deterministic, jax.eval_shape(deterministic.init, key, x), x)


def test_user_combinator_gradients_every_path(x64):
    """Every grad mode and per-example path accepts it; the fast paths use the protocol's fallbacks."""
    model, params, x, y = _with_user_combinator()
    loss = fbp.SoftmaxCrossEntropy()
    key = jax.random.PRNGKey(5)

    def paths(params, x, y, key):
        out = {grad: fbp.value_and_grad(model, loss, grad=grad)(params, x, y, key) for grad in fbp.grads.GRAD_MODES}
        for per_example in (True, "vmap"):
            out[f"averaged {per_example}"] = fbp.value_and_grad(model, loss, per_example=per_example)(params, x, y)
            out[f"clipped {per_example}"] = clipped_value_and_grad(model, loss, 0.1, per_example=per_example)(
                params, x, y
            )
        out["averaged key"] = fbp.value_and_grad(model, loss, per_example=True)(params, x, y, key)
        out["stacked key"] = fbp.per_example_value_and_grad(model, loss)(params, x, y, key)
        return out

    out = jax.jit(paths)(params, x, y, key)
    for grad in ("autodiff", "custom_vjp"):
        chex.assert_trees_all_close(out[grad], out["manual"], **FLOAT64)
    chex.assert_trees_all_close(out["averaged True"], out["averaged vmap"], **FLOAT64)
    chex.assert_trees_all_close(out["clipped True"], out["clipped vmap"], **FLOAT64)
    values, stacked = out["stacked key"]  # with a key, example i draws fold_in(key, i) on both paths
    chex.assert_trees_all_close(
        out["averaged key"], (values.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked)), **FLOAT64
    )


def test_checker_searches_a_user_combinator(x64):
    """check_gradients passes it, and finds a wrong backward inside it by the child's path."""
    model, params, x, y = _with_user_combinator()
    loss = fbp.SoftmaxCrossEntropy()
    assert fbp.check_gradients(model, loss, params, x, y).ok
    bad_model, params, x, y = _with_user_combinator(right=WrongTanh())
    report = fbp.check_gradients(bad_model, loss, params, x, y)
    assert not report.ok
    assert report.first_bad_path == "[1].right"
