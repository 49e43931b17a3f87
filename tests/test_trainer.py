"""fbp.training.fit (the loop behind ``fbp train``) and fbp.models: outputs, resume, faults, retracing."""

import dataclasses
import json
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import data, models
from fbp.check import GradientCheckError
from fbp.training import checkpoint
from fbp.training.faults import NonFiniteError, RetraceGuard, RetraceWarning, first_nonfinite
from fbp.training.fit import TrainConfig, fit

TINY = TrainConfig(model="mlp:16", lr=0.01, epochs=3, batch_size=64, quiet=True, keep_checkpoints=2)


def _leaves_equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Three epochs of TINY on digits, recording every warning."""
    out = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(dataclasses.replace(TINY, out=str(out)))
    return result, caught


def test_fit_writes_metrics_checkpoints_plot_and_config(uninterrupted):
    result, caught = uninterrupted
    out = result.out_dir
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and [line["epoch"] for line in lines] == [1, 2, 3]
    assert set(lines[0]) == {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "seconds",
                             "steps_per_second", "skipped"}
    assert lines[-1]["step"] == 3 * (1438 // 64) and lines[-1]["skipped"] == 0
    assert lines[-1]["test_accuracy"] > 0.8  # 3 epochs of a small MLP on digits: ~0.9
    assert [epoch for epoch, _ in checkpoint.list_checkpoints(out / "checkpoints")] == [2, 3]  # keep_checkpoints=2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["model"] == "mlp:16"
    assert not [w for w in caught if issubclass(w.category, RetraceWarning)]  # fixed shapes: no retrace


def test_resume_reaches_the_same_parameters(uninterrupted, tmp_path):
    result, _ = uninterrupted
    first = fit(dataclasses.replace(TINY, out=str(tmp_path), epochs=1))
    assert len(first.history) == 1
    resumed = fit(dataclasses.replace(TINY, out=str(tmp_path), resume=True))
    assert [line["epoch"] for line in resumed.history] == [1, 2, 3]
    assert _leaves_equal(resumed.state, result.state)  # data order from (seed, epoch): bit-identical


def test_resume_warns_when_options_changed(tmp_path):
    config = dataclasses.replace(TINY, out=str(tmp_path), epochs=1)
    fit(config)
    with pytest.warns(UserWarning, match=r"options differ .*lr 0.01 -> 0.02"):
        result = fit(dataclasses.replace(config, resume=True, lr=0.02))  # already at epoch 1: nothing to train
    assert len(result.history) == 1


def test_resume_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder .*checkpoints; run once without --resume"):
        fit(dataclasses.replace(TINY, out=str(tmp_path), resume=True))


def test_a_fresh_run_refuses_to_delete_foreign_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not fbp checkpoints \(notes.txt\)"):
        fit(dataclasses.replace(TINY, out=str(tmp_path)))
    assert (tmp_path / "checkpoints" / "notes.txt").exists()


def test_fit_trains_a_cnn_in_bfloat16_as_a_loop_of_steps(tmp_path):
    # on CPU a model with convolutions runs its epochs as a loop of the jitted step (epoch_strategy)
    config = dataclasses.replace(TINY, model="cnn:4", epochs=2, precision="bfloat16", out=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(config)
    assert not [w for w in caught if issubclass(w.category, RetraceWarning)]
    assert [line["step"] for line in result.history] == [22, 44] and result.history[-1]["skipped"] == 0
    assert result.history[-1]["test_accuracy"] > 0.5  # two epochs of a 4-channel CNN: ~0.8; chance is 0.1
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.state.params)} == {jnp.dtype("float32")}


def _regression(poison: bool):
    ds = data.synthetic_regression(jax.random.PRNGKey(0), num_examples=200)  # 160 train: 5 full batches of 32
    if poison:
        x = ds.x_train.copy()
        x[5, 0] = 1e30  # finite, but its squared error overflows float32 to inf
        ds = ds._replace(x_train=x)
    return ds


REGRESSION = TrainConfig(data="synthetic-regression", model="mlp:8", batch_size=32, quiet=True)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = dataclasses.replace(REGRESSION, out=str(tmp_path), epochs=2)
    clean = fit(config, _regression(poison=False))
    good = checkpoint.latest(tmp_path / "checkpoints")
    digest = checkpoint.read_meta(good)["sha256"]
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1[1-5] \(epoch 3, batch [1-5] of 5\); "
                                             r"stopped without saving\. The last good checkpoint is .*epoch_000002"):
        fit(dataclasses.replace(config, epochs=4, resume=True), _regression(poison=True))
    assert checkpoint.latest(tmp_path / "checkpoints") == good
    assert checkpoint.read_meta(good)["sha256"] == digest
    state, _ = checkpoint.restore(good, clean.state)  # unchanged: restores, and matches its SHA-256
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_nonfinite_skip_counts_the_skipped_updates(tmp_path):
    config = dataclasses.replace(REGRESSION, out=str(tmp_path), epochs=2, on_nonfinite="skip")
    result = fit(config, _regression(poison=True))
    assert [line["skipped"] for line in result.history] == [1, 1]  # the poisoned example, once per epoch
    assert result.history[-1]["step"] == 2 * 5 - 2  # skipped updates do not count as steps
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(result.state.params))


def test_nan_in_the_data_is_refused_before_training(tmp_path):
    ds = _regression(poison=False)
    y = ds.y_train.copy()
    y[[3, 8], 0] = np.nan
    with pytest.raises(ValueError, match=r"y_train \(160, 1\) holds 2 non-finite value\(s\).*first at index \(3, 0\)"):
        fit(dataclasses.replace(REGRESSION, out=str(tmp_path / "o")), ds._replace(y_train=y))
    assert not (tmp_path / "o").exists()


def test_first_nonfinite_names_the_leaf():
    grads = [{"W": jnp.ones((2, 2)), "b": jnp.ones(2)}, {}, {"W": jnp.array([[1.0, jnp.inf]]), "b": jnp.zeros(1)}]
    assert first_nonfinite(jnp.float32(1.0), grads) == "[2]['W']"
    assert first_nonfinite(jnp.float32(jnp.nan), grads) == "loss"
    assert first_nonfinite(1.0, [{"W": jnp.ones(2)}]) is None


def test_retrace_guard_warns_on_a_new_shape_only():
    model = fbp.Sequential([fbp.Dense(3)])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    optimizer = optax.sgd(0.1)
    guard = RetraceGuard(fbp.make_train_step(model, fbp.MSE(), optimizer))
    state = fbp.TrainState.create(params, optimizer)
    xs, ys = jnp.ones((2, 8, 4)), jnp.zeros((2, 8, 3))
    state, _ = fbp.train_epoch(guard.step, state, xs, ys)
    guard.arm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails here
        state, _ = fbp.train_epoch(guard.step, state, xs, ys)
    assert guard.traces == 1
    with pytest.warns(RetraceWarning, match=r"traced again \(trace 2, for x \(7, 4\) float32"):
        fbp.train_epoch(guard.step, state, xs[:, :7], ys[:, :7])


@dataclass(frozen=True)
class WrongDense(fbp.Dense):
    """A planted bug: dW twice too large."""

    def backward(self, params, x, dy):
        dparams, dx = super().backward(params, x, dy)
        return {**dparams, "W": 2 * dparams["W"]}, dx


def test_check_gradients_aborts_on_a_wrong_backward(tmp_path, monkeypatch):
    ds = data.synthetic_classification(jax.random.PRNGKey(0), num_examples=80, num_features=4, num_classes=3)
    config = TrainConfig(data="synthetic-classification", epochs=1, batch_size=16, quiet=True,
                         check_gradients=True, out=str(tmp_path))
    monkeypatch.setattr(models, "build", lambda spec, shape, outputs: fbp.Sequential([WrongDense(outputs)]))
    printed = []
    with pytest.raises(GradientCheckError, match="failed on the first batch"):
        fit(config, ds, log=printed.append)
    assert "FAIL" in printed[0]
    assert not (tmp_path / "checkpoints").exists()


class UnscaledDropout(fbp.Dropout):
    """A planted bug only a check with the run's key sees: the mask without its 1/(1 - rate)."""

    def backward(self, params, scaled_mask, dy):
        return {}, dy if scaled_mask is None else dy * (scaled_mask > 0)


def test_check_gradients_draws_the_dropout_mask_of_the_run(tmp_path, monkeypatch):
    ds = data.synthetic_classification(jax.random.PRNGKey(0), num_examples=80, num_features=4, num_classes=3)
    config = TrainConfig(data="synthetic-classification", epochs=1, batch_size=16, quiet=True,
                         check_gradients=True, out=str(tmp_path))
    build = lambda spec, shape, outputs: fbp.Sequential([fbp.Dense(8), UnscaledDropout(0.5), fbp.Dense(outputs)])
    monkeypatch.setattr(models, "build", build)
    with pytest.raises(GradientCheckError, match="failed on the first batch"):
        fit(config, ds, log=lambda line: None)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"data": "cifar"}, "data must be one of digits"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"clip_norm": 1.0}, r"needs per_example \(--per-example\)"),
        ({"per_example": True, "noise_multiplier": 1.0}, r"needs clip_norm \(--clip-norm\)"),
        ({"devices": 3, "batch_size": 32}, "devices must be >= 1 and divide batch_size 32"),
        ({"model": "resnet"}, "got kind .resnet."),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of stop, skip"),
        ({"precision": "fp8"}, "precision must be one of float32, bfloat16, float16"),
        ({"per_example": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "not both"),
        ({"target_epsilon": 2.0}, r"needs per_example and clip_norm"),
        ({"per_example": True, "clip_norm": 1.0, "target_epsilon": -1.0}, "target_epsilon must be a positive"),
        ({"per_example": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.5}, r"delta must lie in \(0, 1\)"),
        ({"delta": 1e-5}, "delta is the delta of DP-SGD's epsilon"),
        ({"sampling": "uniform"}, "sampling must be one of poisson, shuffle"),
        ({"accountant": "moments"}, "accountant must be one of rdp, pld"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TrainConfig(), **changes).validate()


def test_devices_beyond_the_visible_ones(tmp_path):
    if jax.device_count() > 1:
        pytest.skip("this test needs a single-device host")
    with pytest.raises(ValueError, match="asked for 2 devices, but only 1 is visible"):
        fit(dataclasses.replace(TINY, devices=2, out=str(tmp_path)))


def test_models_build_from_specs():
    mlp = models.build("mlp:32,16", (8, 8, 1), 10)
    assert [type(layer).__name__ for layer in mlp.layers] == ["Flatten", "Dense", "ReLU", "Dense", "ReLU", "Dense"]
    assert mlp.layers[0].num_axes == 3
    assert [type(layer).__name__ for layer in models.build("mlp", (20,), 2).layers] == [
        "Dense", "ReLU", "Dense", "ReLU", "Dense"]
    cnn = models.build("cnn:4,8", (8, 8, 1), 10)
    params = cnn.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    assert cnn.apply(params, jnp.zeros((5, 8, 8, 1))).shape == (5, 10)
    assert params[-1]["W"].shape == (2 * 2 * 8, 10)  # two 2x2 poolings: 8x8 -> 2x2


@pytest.mark.parametrize(
    ("spec", "shape", "match"),
    [
        ("cnn", (20,), r"a cnn needs image inputs \(H, W, C\), got examples of shape \(20,\)"),
        ("cnn:4,4,4,4", (8, 8, 1), "halve"),
        ("mlp:12,x", (4,), "expected positive integer widths"),
        ("mlp:0", (4,), "expected positive integer widths"),
        ("resnet", (4,), "got kind 'resnet'"),
    ],
)
def test_models_bad_specs(spec, shape, match):
    with pytest.raises(ValueError, match=match):
        models.build(spec, shape, 3)
