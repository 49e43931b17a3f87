"""The gradient checker itself: it passes correct models, fails planted bugs (issue 3), reports readably.

The six planted bugs of issue 3 are entries of tests/mutants.py, checked here
next to their correct twins; the rest of the list runs in test_mutants.py.
Issue 13: stochastic layers are checked with a key (the same mask in every
precision), every per-example hook a train step runs is checked against jax.vmap
of its layer's own backward, and inputs the checker cannot judge are refused.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mutants import (
    BY_NAME,
    ISSUE_3,
    cross_entropy_no_mean_forward,
    dense_dW_transposed,
    dropout_no_scale,
    mutate,
    problems,
)
from registry import ParallelSum

import fbp
from fbp import check
from fbp.check import GradientCheckError, check_layer, check_loss, finite_diff
from fbp.check.hooks import FALLBACK
from fbp.layers.base import call_per_example_backward


def _cnn_residual():
    return fbp.Sequential(
        [
            fbp.Conv2D(3),
            fbp.ReLU(),
            fbp.MaxPool2D(2),
            fbp.Residual(fbp.Sequential([fbp.Conv2D(3), fbp.Tanh()])),
            fbp.Flatten(),
            fbp.Dense(3),
        ]
    )


def _case(model, dtype="float32", batch=4, shape=(5,), seed=0, loss=None):
    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(key_x, (batch, *shape), dtype)
    y = jax.random.randint(key_y, (batch,), 0, 3)
    return model, loss or fbp.SoftmaxCrossEntropy(), model.init(key_params, x), x, y


@dataclasses.dataclass(frozen=True)
class ScaledDense(fbp.Dense):
    """dW times (1 + delta): a planted relative error of delta."""

    delta: float = 0.01

    def backward(self, params, x, dy):
        dparams, dx = super().backward(params, x, dy)
        return {**dparams, "W": dparams["W"] * (1 + self.delta)}, dx


def _mlp(first=None, activation=None, last=None):
    """Dense(5) -> Tanh -> Dense(3), with any of the three replaced."""
    return fbp.Sequential([first or fbp.Dense(5), activation or fbp.Tanh(), last or fbp.Dense(3)])


@functools.cache
def _correct_twin_passes(stack, layer) -> bool:
    """The mutant's model with the correct layer (cached: three bugs share a twin)."""
    return fbp.check_gradients(*stack.build(layer)).ok


@pytest.mark.parametrize("name", ISSUE_3)
def test_issue_3_bugs_fail_and_their_correct_twins_pass(name):
    mutant = BY_NAME[ISSUE_3[name]]
    report = fbp.check_gradients(*mutant.build())
    assert not problems(mutant, report), f"{name}: {problems(mutant, report)}\n{report}"
    assert _correct_twin_passes(mutant.model, mutant.layer)


# --- correct models pass --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_correct_cnn_with_residual_passes(dtype):
    with jax.enable_x64(dtype == "float64"):
        report = fbp.check_gradients(*_case(_cnn_residual(), dtype, shape=(6, 6, 2)))
    assert report.ok, str(report)
    assert report.dtype == dtype
    assert {r.check for r in report.rows} - set(check.HOOKS) == {"autodiff", "finite-diff", "per-example"}
    assert report.hook_layers == 4  # both Conv2D, the Residual and the model: the per-example hooks the step runs
    report.raise_if_failed()  # a pass raises nothing


def test_bfloat16_params_work():
    """bf16 params and inputs: the three witnesses run (finite differences still in float64) and pass."""
    report = fbp.check_gradients(*_case(_mlp(first=fbp.Dense(8)), "bfloat16"))
    assert report.dtype == "bfloat16" and report.rtol == check.DEFAULT_RTOL["bfloat16"]
    assert report.ok, str(report)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_gradient_zero_by_symmetry_passes(dtype):
    """Balanced labels, equal logits: dL/db and dL/dW are exactly 0 and the manual sums leave rounding.

    Neither the rms term (r is 0) nor jax's own noise (it is 0 too) covers that
    rounding; the batch-sum term (SUM_FACTOR * B * eps * mean_j |g_j|) does.
    """
    with jax.enable_x64(dtype == "float64"):
        model = fbp.Sequential([fbp.Dense(3)])
        params = [{"W": jnp.zeros((4, 3), dtype), "b": jnp.zeros((3,), dtype)}]
        x = jnp.ones((3, 4), dtype) / 3
        report = fbp.check_gradients(model, fbp.SoftmaxCrossEntropy(), params, x, jnp.array([0, 1, 2]))
    assert report.ok, str(report)


def test_a_finite_difference_step_across_a_relu_kink_is_not_a_failure(monkeypatch):
    """A ReLU input of 3e-7: the base step h = 1e-6 straddles the kink, h/100 does not.

    With the closest of the three steps counting the check passes; with the
    base step alone it fails, so the retry is what saves it (not slack).
    """
    with jax.enable_x64(True):
        model = fbp.Sequential([fbp.Dense(2), fbp.ReLU(), fbp.Dense(3)])
        x = jnp.array([[1.0, 0.5], [-0.5, 1.0]])
        params = model.init(jax.random.PRNGKey(0), x)
        z = x[0] @ params[0]["W"]
        params[0]["b"] = jnp.array([3e-7 - z[0], 1.0])  # example 0, unit 0 sits 3e-7 from the kink
        case = (model, fbp.SoftmaxCrossEntropy(), params, x, jnp.array([0, 2]))
        assert fbp.check_gradients(*case, directions=4).ok
        monkeypatch.setattr(finite_diff, "FD_STEPS", (1.0,))
        assert not fbp.check_gradients(*case, directions=4, locate=False).ok


# --- bugs fail, with the right names --------------------------------------------


def test_a_one_percent_error_in_one_weight_gradient_fails():
    report = fbp.check_gradients(*_case(_mlp(last=ScaledDense(3, delta=0.01))))
    assert not report.ok
    assert report.failed_leaves == ["[2]['W']"]  # only that leaf: the others are right
    assert report.first_bad_layer == "[2] ScaledDense(3)"
    assert report.hook_layers == 0 and report.first_bad_hook is None  # hooks are checked against a right backward
    with pytest.raises(GradientCheckError, match=r"first wrong layer: \[2\] ScaledDense\(3\)"):
        report.raise_if_failed()


def test_the_search_descends_into_a_user_written_combinator():
    """Not a Sequential or Residual: ``children`` alone lets the search name the wrong layer inside it."""
    report = fbp.check_gradients(*_case(_mlp(last=ParallelSum(fbp.Dense(3), ScaledDense(3, delta=0.01)))))
    assert report.failed_leaves == ["[2]['right']['W']"]
    assert report.first_bad_layer == "[2].right ScaledDense(3)", str(report)


# smallest relative errors asserted detected per dtype; docs/checker.md has the measured floors
MUST_DETECT = {"float64": 1e-8, "float32": 1e-3, "bfloat16": 0.3}


@pytest.mark.parametrize("dtype", list(MUST_DETECT))
def test_detection_floor(dtype, record_property):
    """A planted relative error of MUST_DETECT[dtype] fails; whether a tenth of it does too is recorded."""

    def detected(delta):
        case = _case(_mlp(first=fbp.Dense(8), last=ScaledDense(3, delta=delta)), dtype)
        return not fbp.check_gradients(*case, locate=False).ok

    with jax.enable_x64(dtype == "float64"):
        assert detected(MUST_DETECT[dtype])
        floor = MUST_DETECT[dtype] / 10 if detected(MUST_DETECT[dtype] / 10) else MUST_DETECT[dtype]
    record_property(f"detection_floor_{dtype}", floor)
    print(f"{dtype}: a planted relative error of {floor:.2g} in one leaf is detected")


# --- the report --------------------------------------------------------------


def test_report_table_names_leaf_shape_errors_and_verdict():
    report = fbp.check_gradients(*_case(_mlp(last=ScaledDense(3, delta=0.01))))
    text = str(report)
    assert text.startswith("gradient check of Sequential(3 layers) (float32, rtol 0.0001): FAILED")
    header = text.splitlines()[1].split()
    assert header[:3] == ["check", "leaf", "shape"] and "cosine" in header and "err/tol" in header
    bad = next(r for r in report.rows if r.path == "[2]['W']" and r.check == "autodiff")
    assert bad.shape == (5, 3) and not bad.ok
    # c = 1.01 r: |c - r| / (|r| + rms(r)) = 0.01 |r| / (|r| + rms(r)), in [0.005, 0.01) at the largest |r|
    assert 0.005 <= bad.max_rel_err < 0.01
    assert len(bad.worst_index) == 2 and bad.cosine > 0.9999 and bad.excess > 1
    line = next(line for line in text.splitlines() if line.startswith("autodiff     [2]['W']"))
    assert line.endswith("FAIL") and "(5, 3)" in line
    assert "first wrong layer: [2] ScaledDense(3)\nScaledDense(3): FAILED" in text  # then that layer's own report


def test_check_layer_and_check_loss():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    dense = fbp.Dense(5)
    params = dense.init(jax.random.PRNGKey(2), x)
    assert check_layer(dense, params, x).ok
    report = check_layer(mutate(dense, dense_dW_transposed), params, x)
    assert [r.path for r in report.rows if not r.ok] == ["['W']"]
    assert str(report).startswith("Dense(5): FAILED")
    with pytest.raises(GradientCheckError):
        report.raise_if_failed()
    labels = jnp.array([0, 1, 2, 1])
    assert check_loss(fbp.SoftmaxCrossEntropy(), x[:, :3], labels).ok
    no_mean = mutate(fbp.SoftmaxCrossEntropy(), forward=cross_entropy_no_mean_forward)
    assert not check_loss(no_mean, x[:, :3], labels).ok


@dataclasses.dataclass(frozen=True)
class RaisingDense(fbp.Dense):
    def backward(self, params, x, dy):
        raise ValueError("backward not written yet")


@dataclasses.dataclass(frozen=True)
class WrongShapeDense(fbp.Dense):
    def backward(self, params, x, dy):
        dparams, dx = super().backward(params, x, dy)
        return {"W": dparams["W"][:-1], "b": dparams["b"]}, dx


@dataclasses.dataclass(frozen=True)
class MissingBiasDense(fbp.Dense):
    def backward(self, params, x, dy):
        dparams, dx = super().backward(params, x, dy)
        return {"W": dparams["W"]}, dx


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (RaisingDense(5), "raised ValueError: backward not written yet"),
        (WrongShapeDense(5), "shape (4, 5)"),
        (MissingBiasDense(5), "missing"),
    ],
)
def test_a_backward_that_raises_or_misshapes_is_a_failing_row(layer, why):
    report = fbp.check_gradients(*_case(_mlp(first=layer)))
    assert not report.ok
    assert report.first_bad_path == "[0]"
    assert any(why in str(r.worst_index) for r in report.failures), str(report)


def test_tolerances_scale_with_the_dtype():
    assert check.precision_of({"W": jnp.ones(2, jnp.bfloat16)}, jnp.ones(2)) == "bfloat16"
    assert check.precision_of({"W": jnp.ones(2, jnp.float16)}, jnp.ones(2, jnp.bfloat16)) == "bfloat16"
    assert check.precision_of(jnp.ones(2, jnp.int32)) == "float32"  # nothing to differentiate: the default
    rtols = [check.default_rtol(d) for d in ("float64", "float32", "float16", "bfloat16")]
    assert rtols == sorted(rtols)
    epsilons = [float(jnp.finfo(d).eps) for d in ("float64", "float32", "float16", "bfloat16")]
    assert all(rtol > eps for rtol, eps in zip(rtols, epsilons))  # at least one epsilon of room
    # compare_leaf: an element fails exactly when |c - r| > rtol (|r| + rms(r)) + the noise allowance
    r = np.array([1.0, -2.0, 0.0, 4.0])
    rms = float(np.sqrt(np.mean(r * r)))
    edge = r.copy()
    edge[2] += 0.99 * 1e-3 * rms
    assert check.compare_leaf("t", "p", r, edge, rtol=1e-3).ok
    edge[2] += 0.02 * 1e-3 * rms
    assert not check.compare_leaf("t", "p", r, edge, rtol=1e-3).ok
    assert check.compare_leaf("t", "p", r, edge, rtol=1e-3, noise=1e-3).ok


# --- randomness: Dropout checked with a key, the same mask in every precision -----------------


def test_dropout_draws_the_same_mask_with_and_without_x64():
    """The checker's float64 reruns must see the float32 step's mask: the mask depends on key and shape only."""
    layer, key = fbp.Dropout(0.3), jax.random.PRNGKey(5)
    mask = layer.forward({}, jnp.ones((64,), jnp.float32), key=key)[1]
    with jax.enable_x64(True):
        mask64 = layer.forward({}, jnp.ones((64,), jnp.float64), key=key)[1]
        mask_x64_float32 = layer.forward({}, jnp.ones((64,), jnp.float32), key=key)[1]
    np.testing.assert_array_equal(np.asarray(mask) > 0, np.asarray(mask64) > 0)
    np.testing.assert_array_equal(np.asarray(mask) > 0, np.asarray(mask_x64_float32) > 0)
    assert 0 < int((np.asarray(mask) > 0).sum()) < 64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_check_layer_catches_a_dropout_scale_bug_with_a_key(dtype):
    """Issue 13: in float32 the float64 noise rerun drew another mask, which widened the tolerance enough."""
    with jax.enable_x64(dtype == "float64"):
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 6), dtype)
        key = jax.random.PRNGKey(3)
        assert check_layer(fbp.Dropout(0.5), {}, x, key=key).ok
        assert not check_layer(mutate(fbp.Dropout(0.5), dropout_no_scale), {}, x, key=key).ok
        assert check_layer(mutate(fbp.Dropout(0.5), dropout_no_scale), {}, x).ok  # no key: the identity, no bug


def test_check_gradients_uses_the_key_in_every_witness():
    """A model with Dropout passes with a key; the key really reaches the model (dropout is not the identity)."""
    model = fbp.Sequential([fbp.Dense(6), fbp.Dropout(0.5), fbp.Tanh(), fbp.Dense(3)])
    case = _case(model)
    key = jax.random.PRNGKey(11)
    report = fbp.check_gradients(*case, key=key)
    assert report.ok, str(report)
    assert {r.check for r in report.rows} >= {"autodiff", "finite-diff", "per-example"}
    _, _, params, x, _ = case
    assert not np.allclose(model.apply(params, x, key=key), model.apply(params, x))


# --- per-example hooks: checked against jax.vmap of each layer's own backward ------------------


@dataclasses.dataclass(frozen=True)
class NoHooks:
    """A user layer y = x W with no per-example hooks: the step runs the protocol's fallbacks on it."""

    features: int = 3

    def init(self, key, x):
        return {"W": jax.random.normal(key, (x.shape[-1], self.features), x.dtype)}

    def apply(self, params, x, *, key=None):
        return x @ params["W"]

    def forward(self, params, x, *, key=None):
        return self.apply(params, x), x

    def backward(self, params, x, dy):
        return {"W": x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])}, dy @ params["W"].T


@dataclasses.dataclass(frozen=True)
class RaisingHookDense(fbp.Dense):
    def per_example_backward(self, params, x, dy):
        raise ValueError("not written yet")


@dataclasses.dataclass(frozen=True)
class ForgetfulParallelSum(ParallelSum):
    """ParallelSum whose per_example_backward forgets the right branch's norms: a combinator's own wiring bug."""

    def per_example_backward(self, params, cache, dy):
        sq_left, dx_left, left = call_per_example_backward(self.left, params["left"], cache[0], dy)
        _, dx_right, right = call_per_example_backward(self.right, params["right"], cache[1], dy)
        return sq_left, dx_left + dx_right, lambda w: {"left": left(w), "right": right(w)}


def test_every_hook_the_step_runs_is_checked_and_named_by_layer():
    model = fbp.Sequential(
        [fbp.Dense(5), fbp.Tanh(), fbp.Residual(fbp.Sequential([fbp.Dense(5), fbp.LayerNorm()])), NoHooks(3)]
    )
    report = fbp.check_gradients(*_case(model))
    assert report.ok, str(report)
    hooks = {(r.path.split(" ")[0], r.check) for r in report.rows if r.check in check.HOOKS + (FALLBACK,)}
    assert hooks >= {
        ("[0]", "per_example_backward"),  # Dense: one walk gives norms, dx and the weighted sum
        ("[2].block[0]", "per_example_backward"),
        ("[2].block[1]", "per_example_sq_norms"),
        ("[2].block[1]", FALLBACK),  # LayerNorm has no weighted hook: the step falls back to backward
        ("[3]", FALLBACK),  # no hooks at all: jax.vmap of its backward
        ("model", "per_example_backward"),
    }
    assert report.hook_layers == 5
    dx = next(r for r in report.rows if r.path == "model dx")
    assert dx.shape == (4, 5) and dx.ok


def test_a_hook_that_raises_is_a_failing_row_naming_layer_and_hook():
    report = fbp.check_gradients(*_case(_mlp(first=RaisingHookDense(5))))
    assert not report.ok
    assert report.first_bad_layer == "[0] RaisingHookDense(5)"
    assert report.first_bad_hook == "[0] RaisingHookDense(5).per_example_backward"
    assert "raised ValueError: not written yet" in str(report)
    assert "first wrong hook: [0] RaisingHookDense(5).per_example_backward" in str(report)


def test_a_combinator_that_wires_its_childrens_hooks_wrong_is_named():
    """Its children's hooks pass, the model's fail: the second pass finds the combinator itself."""
    model = _mlp(last=ForgetfulParallelSum(fbp.Dense(3), fbp.Dense(3)))
    report = fbp.check_gradients(*_case(model))
    assert report.first_bad_layer == "[2] ForgetfulParallelSum(Dense(3), Dense(3))", str(report)
    assert report.first_bad_hook.endswith(".per_example_backward")
    assert "[2] sq_norms" in report.failed_leaves and "[2] weighted['right']['W']" not in report.failed_leaves


def test_hooks_are_checked_with_the_dropout_key():
    model = fbp.Sequential([fbp.Dense(6), fbp.Dropout(0.5), fbp.Dense(3)])
    report = fbp.check_gradients(*_case(model), key=jax.random.PRNGKey(2))
    assert report.ok and report.hook_layers == 3, str(report)


def test_check_layer_checks_the_hooks_of_a_batched_layer():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    dense = fbp.Dense(3)
    params = dense.init(jax.random.PRNGKey(2), x)
    report = check_layer(dense, params, x, hooks=True)
    assert report.ok and {r.check for r in report.rows} == {"vjp", "per_example_backward"}
    planted = mutate(dense, methods=BY_NAME["dense hook: per-example norm missing ||db_i||^2"].methods)
    assert [r.path for r in check_layer(planted, params, x, hooks=True).rows if not r.ok] == ["model sq_norms"]


# --- what the checker refuses: inputs it cannot judge --------------------------------------------


def test_nan_in_the_labels_is_blamed_on_the_data_not_the_loss():
    model, loss, params, x, _ = _case(_mlp(last=fbp.Dense(2)), loss=fbp.MSE())
    y = jnp.zeros((4, 2)).at[2, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"check_gradients: y \(4, 2\) holds 1 non-finite value.*index \(2, 1\).*data"):
        fbp.check_gradients(model, loss, params, x, y)


def test_a_list_of_layers_is_not_a_model():
    _, loss, params, x, y = _case(_mlp())
    with pytest.raises(TypeError, match=r"check_gradients: expected a layer .* got a list.*fbp.Sequential\(\[\.\.\.\]\)"):
        fbp.check_gradients([fbp.Dense(5), fbp.Tanh(), fbp.Dense(3)], loss, params, x, y)
