"""fbp.training.step: the train step in every gradient mode, per-example gradients, clipping, DP noise,
the scan-fused epoch, tracing, donation and determinism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import data, models
from fbp.training.precision import Policy, get_policy, value_and_grad_with_policy


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _setup(ds, spec="mlp:32", seed=0, lr=1e-3):
    model = models.build(spec, ds.input_shape, 10)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(ds.x_train[:1]))
    return model, params, optax.adam(lr)


def _train(step, state, ds, epochs, seed=0, batch_size=32):
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    for epoch in range(1, epochs + 1):
        b = data.batches(x, y, batch_size, key=data.epoch_key(seed, epoch))
        state, _ = fbp.train_epoch(step, state, b.xs, b.ys)
    return state


@pytest.mark.parametrize(
    ("grad", "per_example"), [("manual", False), ("autodiff", False), ("custom_vjp", False), ("manual", True)]
)
def test_digits_reaches_95_percent(digits, grad, per_example):
    # mlp:256 with adam 2e-3 reaches ~97.8% after 8 epochs (seed 0); 95% leaves room for other platforms
    model, params, optimizer = _setup(digits, "mlp:256", lr=2e-3)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, grad=grad, per_example=per_example)
    state = _train(step, fbp.TrainState.create(params, optimizer), digits, epochs=8)
    accuracy = fbp.evaluate(model, state.params, digits.x_test, digits.y_test)["accuracy"]
    assert accuracy >= 0.95, f"{grad} per_example={per_example}: test accuracy {accuracy:.3f}"


def test_per_example_average_equals_batch_gradient(digits):
    model, params, _ = _setup(digits)
    loss = fbp.SoftmaxCrossEntropy()
    x, y = jnp.asarray(digits.x_train[:16]), jnp.asarray(digits.y_train[:16])
    _, batch = fbp.value_and_grad(model, loss)(params, x, y)
    values, per_example = fbp.per_example_value_and_grad(model, loss)(params, x, y)
    assert values.shape == (16,)
    averaged = jax.tree_util.tree_map(lambda g: g.mean(axis=0), per_example)
    # float32: the two sum the same 16 terms in a different order; 1e-5 is ~100 ulps of the largest entry
    for a, b in zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(averaged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_clipping_bounds_each_examples_update(digits):
    # with plain SGD at lr 1 and a batch of one, the update is minus the clipped gradient itself
    model, params, _ = _setup(digits)
    optimizer, clip_norm = optax.sgd(1.0), 0.05
    loss = fbp.SoftmaxCrossEntropy()
    step = fbp.make_train_step(model, loss, optimizer, per_example=True, clip_norm=clip_norm)
    for i in range(6):
        x, y = jnp.asarray(digits.x_train[i : i + 1]), jnp.asarray(digits.y_train[i : i + 1])
        _, grads = fbp.value_and_grad(model, loss)(params, x, y)
        state, metrics = step(fbp.TrainState.create(params, optimizer), x, y)
        update = jax.tree_util.tree_map(lambda new, old: new - old, state.params, params)
        norm, raw = float(optax.tree.norm(update)), float(optax.tree.norm(grads))
        # float32 rounding of the scaled gradient: relative 1e-5
        assert norm <= clip_norm * (1 + 1e-5)
        np.testing.assert_allclose(norm, min(raw, clip_norm), rtol=1e-4)
        assert float(metrics["clipped_fraction"]) == float(raw > clip_norm)


def test_dp_noise_is_reproducible_from_its_key(digits):
    model, params, optimizer = _setup(digits)
    step = fbp.make_train_step(
        model, fbp.SoftmaxCrossEntropy(), optimizer, per_example=True, clip_norm=1.0, noise_multiplier=1.0
    )
    x, y = jnp.asarray(digits.x_train[:8]), jnp.asarray(digits.y_train[:8])

    def run(seed):
        state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(seed))
        return step(state, x, y)[0].params

    a, b, c = run(1), run(1), run(2)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, w) for u, w in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(c)))
    with pytest.raises(ValueError, match="needs randomness"):
        step(fbp.TrainState.create(params, optimizer), x, y)


def _loop(step, state, xs, ys):
    """The obvious epoch: the jitted step on each batch in turn, metrics stacked."""
    history = []
    for i in range(xs.shape[0]):
        state, metrics = step(state, xs[i], ys[i])
        history.append(metrics)
    return state, {name: np.stack([m[name] for m in history]) for name in history[0]}


def _assert_same(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.optimized  # the claim is about the program users run: XLA's fusions decide the bits
@pytest.mark.parametrize("strategy", ["auto", "scan", "loop"])
def test_train_epoch_equals_the_python_loop(digits, strategy):
    model, params, optimizer = _setup(digits)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    b = data.batches(digits.x_train, digits.y_train, 32, key=data.epoch_key(0, 1))
    looped, losses = _loop(step, fbp.TrainState.create(params, optimizer), b.xs, b.ys)
    epoch, history = fbp.train_epoch(step, fbp.TrainState.create(params, optimizer), b.xs, b.ys, strategy=strategy)
    # the same step compiled into a scan, or the very program of step() in a loop: bit-identical on CPU
    _assert_same(looped, epoch)
    for name in ("loss", "grad_norm", "finite"):
        np.testing.assert_array_equal(losses[name], history[name])
    assert history["loss"].shape == (b.xs.shape[0],)


@pytest.mark.optimized
@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_cnn_epoch_equals_the_python_loop(digits, strategy):
    # on CPU a scan changes how XLA compiles convolution gradients (and their rounding): the CNN loops
    model, params, optimizer = _setup(digits, "cnn:2")
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    b = data.batches(digits.x_train[:192], digits.y_train[:192], 32)
    looped, losses = _loop(step, fbp.TrainState.create(params, optimizer), b.xs, b.ys)
    epoch, history = fbp.train_epoch(step, fbp.TrainState.create(params, optimizer), b.xs, b.ys, strategy=strategy)
    _assert_same(looped, epoch)
    np.testing.assert_array_equal(losses["loss"], history["loss"])


def test_epoch_strategy_is_a_rule_on_cpu(digits):
    if jax.default_backend() != "cpu":
        pytest.skip("the rule is for XLA:CPU; other backends measure both strategies once")
    b = data.batches(digits.x_train[:128], digits.y_train[:128], 32)
    for spec, expected in (("mlp:8", "scan"), ("cnn:2", "loop")):
        model, params, optimizer = _setup(digits, spec)
        step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
        state = fbp.TrainState.create(params, optimizer)
        assert fbp.training.epoch_strategy(step, state, b.xs, b.ys) == expected, spec
        assert list(step.strategies.values()) == [expected]  # decided once per signature, kept on the step
    with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'scan', 'loop'\), got 'unroll'"):
        fbp.train_epoch(step, state, b.xs, b.ys, strategy="unroll")


def test_measured_strategy_leaves_the_state_alone(digits):
    # what other backends do: both strategies run on copies of the state, and the faster one is kept
    model, params, optimizer = _setup(digits, "mlp:8")
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    b = data.batches(digits.x_train[:96], digits.y_train[:96], 32)
    state = fbp.TrainState.create(params, optimizer)
    assert fbp.training.epoch.measure_strategies(step, state, b.xs, b.ys) in ("scan", "loop")
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state))
    _assert_same(state.params, params)


def _guard_setup():
    # Dropout draws from the key, so a step splits state.rng whether or not it applies the update
    model = fbp.Sequential([fbp.Dense(8), fbp.Dropout(0.25), fbp.Dense(2)])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    optimizer = optax.adam(1e-2)
    step = fbp.make_train_step(model, fbp.MSE(), optimizer)
    state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(1))
    return step, state


def test_nonfinite_step_keeps_params_and_optimizer_state_and_advances_the_key():
    step, state = _guard_setup()
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    state, metrics = step(state, x, y)  # one good step: Adam's moments are non-zero from here
    assert bool(metrics["finite"]) and int(state.step) == 1
    old = jax.tree_util.tree_map(np.asarray, state)
    bad, metrics = step(state, x.at[0, 0].set(jnp.nan), y)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    _assert_same((bad.params, bad.opt_state, bad.step), (old.params, old.opt_state, old.step))
    np.testing.assert_array_equal(bad.rng, jax.random.split(old.rng, 3)[0])  # the key moved on
    good, metrics = step(bad, x, y)
    assert bool(metrics["finite"]) and int(good.step) == 2
    assert not np.array_equal(good.params[0]["W"], old.params[0]["W"])


def test_nonfinite_batch_in_an_epoch_is_skipped_alike_by_every_strategy():
    step, state = _guard_setup()
    xs = jnp.ones((4, 4, 3)).at[2, 1, 0].set(jnp.inf)
    ys = jnp.zeros((4, 4, 2))
    looped, expected = _loop(step, fbp.TrainState(*jax.tree_util.tree_map(jnp.copy, tuple(state))), xs, ys)
    np.testing.assert_array_equal(expected["finite"], [True, True, False, True])
    for strategy in ("scan", "loop"):
        copy = fbp.TrainState(*jax.tree_util.tree_map(jnp.copy, tuple(state)))
        epoch, history = fbp.train_epoch(step, copy, xs, ys, strategy=strategy)
        np.testing.assert_array_equal(history["finite"], expected["finite"])
        _assert_same(looped, epoch)
        assert int(epoch.step) == 3


def test_finite_gradients_whose_norm_overflows_count_as_finite():
    from fbp.training.step import grads_finite

    big = [jnp.full((4,), 1e30, jnp.float32)]  # finite leaves; the sum of their squares overflows float32
    norm = optax.tree.norm(big)
    assert not np.isfinite(float(norm)) and bool(grads_finite(norm, big))
    for bad in (jnp.nan, jnp.inf):
        leaves = [jnp.ones(3), jnp.ones(2).at[1].set(bad)]
        assert not bool(grads_finite(optax.tree.norm(leaves), leaves))
    assert bool(grads_finite(optax.tree.norm([jnp.ones(3)]), [jnp.ones(3)]))


def test_batch_checks_run_once_per_signature(digits, monkeypatch):
    model, params, optimizer = _setup(digits)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    calls = []
    checked = fbp.training.step.check_batch
    monkeypatch.setattr(fbp.training.step, "check_batch", lambda *args: calls.append(1) or checked(*args))
    state = fbp.TrainState.create(params, optimizer)
    x, y = jnp.asarray(digits.x_train[:64]), jnp.asarray(digits.y_train[:64])
    for start in (0, 16, 32):
        state, _ = step(state, x[start : start + 16], y[start : start + 16])
    assert len(calls) == 1
    state, _ = step(state, x[:8], y[:8])  # a new shape is checked
    assert len(calls) == 2
    with pytest.raises(ValueError, match="same batch size"):  # and a bad one still fails, every time
        step(state, x[:8], y[:7])
    with pytest.raises(ValueError, match="same batch size"):
        step(state, x[:8], y[:7])


def test_step_traces_once_for_fixed_shapes(digits):
    model = fbp.Sequential([fbp.Flatten(), fbp.Dense(10)])
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(digits.x_train[:1]))
    optimizer = optax.sgd(0.1)
    plain = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    traces = []

    def counted(state, x, y):  # Python runs this only while JAX traces
        traces.append(x.shape)
        return plain.pure(state, x, y)

    step = dataclasses.replace(plain, pure=counted)
    state = fbp.TrainState.create(params, optimizer)
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    for start in range(0, 5 * 16, 16):
        state, _ = step(state, x[start : start + 16], y[start : start + 16])
    assert len(traces) == 1
    state, _ = step(state, x[:8], y[:8])  # a new shape traces again
    assert len(traces) == 2
    b = data.batches(x, y, 16)
    for _ in range(3):
        state, _ = fbp.train_epoch(step, state, b.xs, b.ys, strategy="loop")
    assert len(traces) == 2  # the loop runs the step's own compiled program
    for _ in range(3):
        state, _ = fbp.train_epoch(step, state, b.xs, b.ys, strategy="scan")
    assert len(traces) == 3  # the scan traces the step once


def test_step_donates_the_old_state(digits):
    model, params, optimizer = _setup(digits)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    old = fbp.TrainState.create(params, optimizer)
    new, _ = step(old, jnp.asarray(digits.x_train[:8]), jnp.asarray(digits.y_train[:8]))
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(new.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(params))  # create() copied them


def test_same_seed_gives_bit_identical_params(digits):
    def run(seed):
        model, params, optimizer = _setup(digits, seed=seed)
        step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
        return _train(step, fbp.TrainState.create(params, optimizer), digits, epochs=2, seed=seed).params

    a, b, c = run(0), run(0), run(1)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(jax.tree_util.tree_leaves(a)[0], jax.tree_util.tree_leaves(c)[0])


def test_evaluate_metrics(digits):
    model, params, _ = _setup(digits)
    out = fbp.evaluate(model, params, digits.x_test, digits.y_test, batch_size=100)
    assert set(out) == {"loss", "accuracy"} and 0.0 <= out["accuracy"] <= 1.0
    # an untrained 10-class model: loss near log(10)
    assert abs(out["loss"] - np.log(10)) < 1.0
    assert set(fbp.evaluate(model, params, digits.x_test, digits.y_test, metrics=("loss",))) == {"loss"}
    with pytest.raises(ValueError, match="unknown metrics"):
        fbp.evaluate(model, params, digits.x_test, digits.y_test, metrics=("f1",))


BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits (7 stored)


def _dot_dtypes(step, state, x, y):
    """The operand dtypes of every matmul in the traced step."""
    jaxpr = jax.make_jaxpr(step.pure)(state, x, y).jaxpr
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr)
    return found


def test_bfloat16_training_learns_and_matches_float32(digits):
    model, params, _ = _setup(digits, "mlp:64")  # ~0.95 test accuracy after 3 epochs (seed 0), chance is 0.1
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    finals = {}
    for precision in ("float32", "bfloat16"):
        optimizer = optax.adam(3e-3)
        step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, precision=precision)
        state = fbp.TrainState.create(params, optimizer)
        for epoch in (1, 2, 3):
            b = data.batches(x, y, 32, key=data.epoch_key(0, epoch))
            state, history = fbp.train_epoch(step, state, b.xs, b.ys)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state)} <= {jnp.dtype("float32"), jnp.dtype("int32")}
        accuracy = fbp.evaluate(model, state.params, digits.x_test, digits.y_test)["accuracy"]
        finals[precision] = float(np.mean(history["loss"])), accuracy
    (loss32, acc32), (loss16, acc16) = finals["float32"], finals["bfloat16"]
    assert acc16 >= 0.9 and abs(acc16 - acc32) <= 0.02, finals
    # float32 params and optimizer state: each step's gradient is off by a few bfloat16 roundings, not the weights
    assert abs(loss16 - loss32) <= 4 * BF16_EPS * loss32, finals


def test_bfloat16_policy_computes_in_bfloat16_and_adds_up_in_float32(digits):
    model, params, optimizer = _setup(digits, "mlp:32")
    x, y = jnp.asarray(digits.x_train[:16]), jnp.asarray(digits.y_train[:16])
    state = fbp.TrainState.create(params, optimizer)
    mixed = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, precision="bfloat16")
    assert _dot_dtypes(mixed, state, x, y) == {("bfloat16", "bfloat16")}  # forward and hand-written backward
    assert _dot_dtypes(fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer), state, x, y) == {
        ("float32", "float32")}
    _, metrics = mixed(state, x, y)
    assert metrics["loss"].dtype == metrics["grad_norm"].dtype == jnp.float32
    assert mixed.policy == Policy(compute_dtype="bfloat16") and not get_policy("float32").mixed


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_float16_loss_scale_gives_the_float32_gradient(digits, grad):
    model, params, _ = _setup(digits)
    loss = fbp.SoftmaxCrossEntropy()
    x, y = jnp.asarray(digits.x_train[:16]), jnp.asarray(digits.y_train[:16])
    policy = get_policy("float16")
    assert policy.loss_scale == 2.0**10
    value, grads = value_and_grad_with_policy(model, loss, policy, grad=grad)(params, x, y)
    expected_value, expected = fbp.value_and_grad(model, loss)(params, x, y)
    # float16 keeps 11 significant bits: a few roundings of 2**-11 per matmul, relative to the largest entry
    np.testing.assert_allclose(value, expected_value, rtol=1e-2)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.abs(b).max()))


def test_float16_clipping_bounds_each_examples_update(digits):
    model, params, _ = _setup(digits)
    optimizer, clip_norm = optax.sgd(1.0), 0.05
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, per_example=True, clip_norm=clip_norm,
                               precision="float16")
    x, y = jnp.asarray(digits.x_train[:1]), jnp.asarray(digits.y_train[:1])
    state, metrics = step(fbp.TrainState.create(params, optimizer), x, y)
    update = jax.tree_util.tree_map(lambda new, old: new - old, state.params, params)
    # the loss scale multiplies the per-example norms; the clip is applied at scale * C, then divided out
    np.testing.assert_allclose(float(optax.tree.norm(update)), clip_norm, rtol=1e-2)
    assert float(metrics["clipped_fraction"]) == 1.0


@pytest.mark.parametrize(
    ("precision", "match"),
    [("fp8", r"precision must be one of \('float32', 'bfloat16', 'float16'\)"),
     (Policy, None)],
)
def test_bad_precision(digits, precision, match):
    model, _, optimizer = _setup(digits)
    if precision is Policy:
        with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
            Policy(compute_dtype="int8")
        with pytest.raises(ValueError, match="loss_scale must be a positive number"):
            Policy(loss_scale=0)
        return
    with pytest.raises(ValueError, match=match):
        fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, precision=precision)
