"""The sequence layers (Conv1D, SimpleRNN, GRU, LSTM; Conv2D's explicit padding) checked like every layer.

Backward against jax.vjp of the layer's own apply and forward against a numpy loop
over time (registry_sequences), in float32 and float64, for one sequence and for
two leading axes; the per-example hooks against jax.vmap of the plain backward
over single examples. The planted BPTT bugs (registry_sequences.MUTANTS) run in
test_mutants with the rest. Sizes are tiny: each case is one jit compile.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mutants import SequenceStack
from registry import array, make_params
from registry_sequences import ALL_CASES

import fbp
from fbp.layers.base import call_per_example_backward
from fbp.layers.conv import Conv1D, Conv2D
from fbp.layers.recurrent import GRU, LSTM, SimpleRNN

LEADS = {"single": (), "lead2x3": (2, 3)}
CASE_IDS = [case.name for case in ALL_CASES]


@jax.jit
def _leaves_sq(tree):
    return sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree_util.tree_leaves(tree))


@jax.jit
def _weigh(weights, tree):
    return jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), tree)


# forward against numpy and backward against jax.vjp: tests/test_layers.py runs these cases over its full grid


def _per_example_paths(layer, params, x, dy, weights):
    """The hooks on the batch, and jax.vmap of forward + backward over single examples."""
    _, cache = layer.forward(params, x)
    sq, dx, weighted_grads = call_per_example_backward(layer, params, cache, dy)
    hooks = (
        layer.per_example_sq_norms(params, cache, dy),
        layer.per_example_weighted_grads(params, cache, dy, weights),
    )

    def one(x_i, dy_i):
        return layer.backward(params, layer.forward(params, x_i)[1], dy_i)

    grads, ref_dx = jax.vmap(one)(x, dy)
    return (sq, dx, weighted_grads(weights)), hooks, (_leaves_sq(grads), ref_dx, _weigh(weights, grads))


@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_per_example_hooks_match_vmap(case, x64):
    """Batch 3 of two sequences each: a per-example norm and weighted sum add over an example's own rows."""
    rng = np.random.default_rng(1)
    layer = case.layer
    x = case.make_input(rng, (3, 2), jnp.float64)
    params = make_params(layer, x, rng, jnp.float64)
    dy = array(rng.standard_normal(jax.eval_shape(layer.apply, params, x).shape), jnp.float64)
    weights = array(rng.uniform(-1, 2, 3), jnp.float64)

    (sq, dx, weighted), (sq_hook, weighted_hook), (ref_sq, ref_dx, ref_weighted) = jax.jit(
        _per_example_paths, static_argnums=0
    )(layer, params, x, dy, weights)

    tolerance = {"rtol": 1e-10, "atol": 1e-12}  # float64: the two paths only sum in different orders
    chex.assert_trees_all_close((sq, sq_hook), (ref_sq, ref_sq), **tolerance)
    chex.assert_trees_all_close((weighted, weighted_hook), (ref_weighted, ref_weighted), **tolerance)
    chex.assert_trees_all_close(dx, ref_dx, **tolerance)


def test_checker_passes_a_correct_sequence_model():
    """Every new layer in one model, hooks included, so the catches of test_mutants are the bugs' and not the
    checker's."""
    layers = (Conv1D(2, padding=1), GRU(2, bidirectional=True), LSTM(2, return_sequences=False), fbp.Dense(3))
    stack = SequenceStack(layers, per_step=False)
    report = fbp.check_gradients(*stack.build(None))
    assert report.ok, str(report)
    assert report.hook_layers == 5  # Conv1D, GRU, LSTM, Dense and the model: the hooks a clipped step runs


def test_hidden_grads_are_the_gradient_of_a_perturbation_of_each_h_t(x64):
    """``hidden_grads`` against jax.grad of an independent SimpleRNN loop with eps_t added to h_t."""
    layer = SimpleRNN(3, return_sequences=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4), jnp.float64)
    params = layer.init(jax.random.PRNGKey(1), x)
    dy = jax.random.normal(jax.random.PRNGKey(2), (2, 3), jnp.float64)

    def loss(eps):  # eps: (T, N, H)
        h = jnp.zeros((2, 3), jnp.float64)
        for t in range(5):
            h = jnp.tanh(x[:, t] @ params["W"] + h @ params["U"] + params["b"][None]) + eps[t]
        return jnp.sum(h * dy)

    expected = jax.grad(loss)(jnp.zeros((5, 2, 3), jnp.float64))
    _, cache = layer.forward(params, x)
    np.testing.assert_allclose(layer.hidden_grads(params, cache, dy), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [SimpleRNN, GRU, LSTM])
def test_init_is_pytorchs(cls):
    """Weights ~ U(-1/sqrt(H), 1/sqrt(H)); b = bias_ih + bias_hh lies within twice that."""
    hidden = 16
    layer = cls(hidden, bidirectional=True)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((2, 3, 5)))
    bound = 1 / np.sqrt(hidden)
    gates = {SimpleRNN: 1, GRU: 3, LSTM: 4}[cls]
    for direction in ("forward", "backward"):
        p = params[direction]
        assert p["W"].shape == (5, gates * hidden) and p["U"].shape == (hidden, gates * hidden)
        for name in ("W", "U"):
            assert np.abs(p[name]).max() <= bound and np.abs(p[name]).max() > 0.9 * bound
        assert np.abs(p["b"]).max() <= 2 * bound
        if cls is GRU:
            assert p["b_hn"].shape == (hidden,) and np.abs(p["b_hn"]).max() <= bound
    assert not np.array_equal(params["forward"]["W"], params["backward"]["W"])


KEY = jax.random.PRNGKey(0)
X = jnp.ones((2, 4, 3))


def _apply(layer, x=X):
    return layer.apply(layer.init(KEY, jax.ShapeDtypeStruct((2, 4, 3), jnp.float32)), x)


# (what, error, message): the layer named, what was expected and what came
# fmt: off
BAD = [
    (lambda: SimpleRNN(0), ValueError, "SimpleRNN: hidden_size must be a positive int, got 0"),
    (lambda: GRU(2.5), ValueError, "GRU: hidden_size must be a positive int, got 2.5"),
    (lambda: SimpleRNN(4, activation="sigmoid"), ValueError,
     "SimpleRNN(4): activation must be 'tanh' or 'relu', got 'sigmoid'"),
    (lambda: LSTM(4, bidirectional="yes"), TypeError, "LSTM(4): bidirectional must be True or False, got 'yes'"),
    (lambda: _apply(LSTM(4), jnp.ones((3,))), ValueError, "LSTM(4): expected x of rank >= 2, got shape (3,)"),
    (lambda: _apply(GRU(4), jnp.ones((2, 4, 5))), ValueError, "GRU(4): expected x[..., time, 3], got shape (2, 4, 5)"),
    (lambda: _apply(GRU(4), jnp.ones((2, 0, 3))), ValueError,
     "GRU(4): expected at least one time step, got shape (2, 0, 3)"),
    (lambda: _apply(SimpleRNN(4), jnp.ones((2, 4, 3), jnp.int32)), TypeError,
     "SimpleRNN(4): expected a floating-point x, got dtype int32"),
    (lambda: GRU(4, bidirectional=True).apply(GRU(4).init(KEY, X), X), ValueError,
     "GRU(4, bidirectional=True): expected params {'forward': ..., 'backward': ...} as init makes them"),
    (lambda: Conv1D(2, padding="FULL"), ValueError, "Conv1D(2): padding must be 'SAME' or 'VALID', got 'FULL'"),
    (lambda: Conv1D(2, padding=(1, 2, 3)), ValueError, "Conv1D(2): padding must be 'SAME', 'VALID', an int >= 0"),
    (lambda: Conv2D(2, padding=(1, (2, -1))), ValueError, "one int or (low, high) pair per spatial axis (H, W)"),
    (lambda: Conv1D(2, kernel_size=(2, 2)), ValueError, "Conv1D(2): kernel_size must be a positive int, got (2, 2)"),
    (lambda: _apply(Conv1D(2, kernel_size=5, padding="VALID")), ValueError,
     "Conv1D(2, kernel_size=5, padding='VALID'): sequence (4,) is smaller than the kernel (5,)"),
    (lambda: _apply(Conv1D(2), jnp.ones((2, 4, 1))), ValueError,
     "Conv1D(2): expected x[..., L, 3] (NWC), got shape (2, 4, 1)"),
]
# fmt: on


@pytest.mark.parametrize(("make", "error", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_config_or_input(make, error, message):
    with pytest.raises(error) as info:
        make()
    assert message in str(info.value)
