"""The hand-written backward passes use no autodiff: they still work with JAX's autodiff switched off.

The references (jax.vjp, jax.grad) are computed first; then every autodiff entry
point of the jax module is patched to raise, and every registry layer's forward
and backward, every loss's backward, and value_and_grad(grad="manual") must run
and agree with them.
"""

import ast
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import ALL_CASES, ALL_LOSS_CASES, array, float_dtype_tolerance, make_params

import fbp
from fbp.zoo import ZOO

AUTODIFF = ("grad", "vjp", "jvp", "linearize", "jacrev", "jacfwd", "value_and_grad", "hessian", "custom_vjp",
            "custom_jvp")
LEAD = (2, 3)  # the shape test_layers.py runs eagerly, so eager kernels are already compiled
TOLERANCE = float_dtype_tolerance(jnp.float32)


@pytest.fixture
def no_autodiff(monkeypatch):
    """Returns a function that, once called, makes every jax autodiff entry point raise."""

    def switch_off():
        for name in AUTODIFF:

            def forbidden(*args, _name=name, **kwargs):
                raise AssertionError(f"jax.{_name} called: a backward pass must be hand-written")

            monkeypatch.setattr(jax, name, forbidden)

    return switch_off


def test_the_patch_is_active(no_autodiff):
    no_autodiff()
    for name in AUTODIFF:
        with pytest.raises(AssertionError, match=f"jax.{name} called"):
            getattr(jax, name)(jnp.sin)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.name)
def test_layer_backward_without_autodiff(case, no_autodiff):
    rng = np.random.default_rng(0)
    layer, key = case.layer, case.layer_key()
    x = case.make_input(rng, LEAD, jnp.float32)
    params = make_params(layer, x, rng, jnp.float32)
    y = layer.apply(params, x, key=key)
    dy = array(rng.standard_normal(y.shape), jnp.float32)
    _, vjp = jax.vjp(lambda p: layer.apply(p, x, key=key), params)
    (ref_dparams,) = vjp(dy)

    no_autodiff()
    y_manual, cache = layer.forward(params, x, key=key)
    dparams, _ = layer.backward(params, cache, dy)
    chex.assert_trees_all_close(y_manual, y, **TOLERANCE)
    chex.assert_trees_all_close(dparams, ref_dparams, **TOLERANCE)


@pytest.mark.parametrize("case", ALL_LOSS_CASES, ids=lambda case: case.name)
def test_loss_backward_without_autodiff(case, no_autodiff):
    rng = np.random.default_rng(0)
    pred, target = case.make_pred(rng, LEAD, jnp.float32), case.make_target(rng, LEAD, jnp.float32)
    ref_dpred = jax.grad(case.loss)(pred, target)

    no_autodiff()
    _, cache = case.loss.forward(pred, target)
    chex.assert_trees_all_close(case.loss.backward(cache), ref_dpred, **TOLERANCE)


@pytest.mark.parametrize("name", ["mlp-log-softmax/cross-entropy", "embedding/cross-entropy"])
def test_manual_value_and_grad_without_autodiff(name, no_autodiff):
    model, loss, params, x, y = ZOO[name].example()
    _, ref_grads = jax.jit(fbp.value_and_grad(model, loss, grad="autodiff"))(params, x, y)

    no_autodiff()
    _, grads = jax.jit(fbp.value_and_grad(model, loss, grad="manual"))(params, x, y)
    chex.assert_trees_all_close(grads, ref_grads, **TOLERANCE)


def test_layer_and_loss_sources_name_no_autodiff():
    """No ``jax.grad``-like attribute or import in the code of fbp/layers and fbp/losses.py (docstrings may)."""
    root = pathlib.Path(fbp.__file__).parent
    for path in [*sorted((root / "layers").glob("*.py")), root / "losses.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in AUTODIFF, f"{path.name}:{node.lineno} uses .{node.attr}"
            if isinstance(node, ast.ImportFrom):
                names = {alias.name for alias in node.names}
                assert not names & set(AUTODIFF), f"{path.name}:{node.lineno} imports {names & set(AUTODIFF)}"
