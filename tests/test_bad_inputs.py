"""The README's table of bad inputs: every row is a case here, asserting the message.

Each case builds its own bad input, calls the public API and checks the error
type and that the message names what was expected and what came. A guard test
keeps the README table and this list in step.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import data
from fbp.training import checkpoint
from fbp.training.faults import first_nonfinite
from fbp.training.fit import TrainConfig, fit

KEY = jax.random.PRNGKey(0)


def _dense_params(width=784, features=10):
    return fbp.Dense(features).init(KEY, jnp.zeros((1, width)))


def _mlp_state():
    model = fbp.Sequential([fbp.Dense(8), fbp.ReLU(), fbp.Dense(3)])
    params = model.init(KEY, jnp.zeros((4, 5)))
    optimizer = optax.sgd(0.1)
    return model, optimizer, fbp.TrainState.create(params, optimizer)


def wrong_feature_width():
    fbp.Dense(10).apply(_dense_params(), jnp.zeros((32, 785)))


def wrong_rank():
    conv = fbp.Conv2D(4, 3)
    params = conv.init(KEY, jnp.zeros((1, 8, 8, 1)))
    conv.apply(params, jnp.zeros((8, 8)))


def float_ids_to_embedding():
    embedding = fbp.Embedding(10, 4)
    embedding.apply(embedding.init(KEY, jnp.zeros((2,), jnp.int32)), jnp.zeros((2,), jnp.float32))


def integer_x_to_dense():
    fbp.Dense(10).apply(_dense_params(), jnp.zeros((2, 784), jnp.int32))


def nan_in_data():
    x = np.ones((6, 3), np.float32)
    x[2, 1] = np.nan
    data.check_finite(data.Dataset("toy", x, np.zeros(6, np.int32), x[:2], np.zeros(2, np.int32), 2))


def inf_in_parameters():
    model, _, state = _mlp_state()
    params = [dict(p) for p in state.params]
    params[2]["W"] = params[2]["W"].at[0, 0].set(jnp.inf)
    x, y = jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32)
    value, grads = fbp.value_and_grad(model, fbp.SoftmaxCrossEntropy())(params, x, y)
    raise FloatingPointError(f"non-finite {first_nonfinite(value, grads)}")


def empty_batch():
    model, optimizer, state = _mlp_state()
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    step(state, jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32))


def labels_out_of_range():
    fbp.SoftmaxCrossEntropy()(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 3]))


def mismatched_x_y():
    model, optimizer, state = _mlp_state()
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)
    step(state, jnp.zeros((8, 5)), jnp.zeros((7,), jnp.int32))


def wrong_target_shape():
    fbp.MSE()(jnp.zeros((4, 2)), jnp.zeros((4, 3)))


def unknown_layer_option():
    fbp.Conv2D(4, 3, padding="FULL")


def unknown_init():
    fbp.Dense(10, weight_init="xavier")


def bad_dropout_rate():
    fbp.Dropout(1.5)


def unknown_grad_mode():
    model, optimizer, _ = _mlp_state()
    fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, grad="backprop")


def malformed_data_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x09\x03" + bytes(12))
    data.read_idx(path, expected_magic=0x00000803)


def missing_data_set(tmp_path):
    data.load_mnist(tmp_path / "nowhere")


def missing_checkpoint_folder(tmp_path):
    fit(TrainConfig(resume=True, out=str(tmp_path / "run"), epochs=1, quiet=True))


def truncated_checkpoint(tmp_path):
    _, _, state = _mlp_state()
    path = checkpoint.save(tmp_path, 1, state)
    biggest = max((f for f in (path / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    checkpoint.restore(path, state)


def checkpoint_from_another_model(tmp_path):
    _, _, state = _mlp_state()
    path = checkpoint.save(tmp_path, 1, state)
    other = fbp.Sequential([fbp.Dense(16), fbp.ReLU(), fbp.Dense(3)])
    other_params = other.init(KEY, jnp.zeros((4, 5)))
    checkpoint.restore(path, fbp.TrainState.create(other_params, optax.sgd(0.1)))


def wrong_params_for_model():
    model, _, state = _mlp_state()
    model.apply(state.params[:2], jnp.zeros((4, 5)))


def wrong_shape_params_leaf():
    model, _, state = _mlp_state()
    params = [dict(p) for p in state.params]
    params[2]["b"] = jnp.zeros((7,))  # the structure is right, one leaf is not
    fbp.value_and_grad(model, fbp.SoftmaxCrossEntropy())(params, jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32))


def integer_params():
    model, _, state = _mlp_state()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), state.params)
    fbp.value_and_grad(model, fbp.SoftmaxCrossEntropy())(params, jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32))


def list_as_model():
    fbp.make_train_step([fbp.Dense(8), fbp.ReLU(), fbp.Dense(3)], fbp.SoftmaxCrossEntropy(), optax.sgd(0.1))


def optimizer_not_from_optax():
    model, _, _ = _mlp_state()
    fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optax.adam)  # the factory, not a GradientTransformation


def non_integer_embedding_size():
    fbp.Embedding(5.5, 3)


def string_leaky_relu_slope():
    fbp.LeakyReLU("0.1")


def nan_in_labels():
    model = fbp.Sequential([fbp.Dense(2)])
    x = jnp.ones((4, 3))
    y = jnp.zeros((4, 2)).at[2, 1].set(jnp.nan)
    fbp.check_gradients(model, fbp.MSE(), model.init(KEY, x), x, y)


def negative_id_in_data():
    ids = np.ones((6, 4), np.int32)
    ids[2, 1] = -1
    labels = np.zeros((6, 4), np.int32)
    data.check_finite(data.Dataset("toy", ids, labels, ids[:2], labels[:2], 11, vocabulary="abcdefghij"))


def probabilities_not_summing_to_one():
    fbp.SoftmaxCrossEntropy()(jnp.zeros((2, 3)), jnp.array([[0.5, 0.5, 0.0], [1.0, 1.0, 0.0]]))


def bce_target_out_of_range():
    fbp.BinaryCrossEntropy()(jnp.zeros((2, 1)), jnp.array([[1.0], [2.0]]))


def negative_layernorm_epsilon():
    fbp.LayerNorm(epsilon=-1)


def layernorm_over_no_features():
    fbp.LayerNorm().init(KEY, jnp.zeros((4, 0)))


def train_state_of_none():
    fbp.TrainState.create(None, optax.sgd(0.1))


def negative_noise_multiplier():
    model, optimizer, _ = _mlp_state()
    fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, per_example=True, clip_norm=1.0,
                        noise_multiplier=-1)


# label (as in the README), the bad input, the error, what the message must say
CASES = {
    "wrong feature width": (wrong_feature_width, ValueError, r"Dense\(10\): expected x\[\.\.\., 784\], got shape \(32, 785\)"),
    "wrong rank": (wrong_rank, ValueError, r"Conv2D\(4.*rank >= 3, got shape \(8, 8\)"),
    "float ids to Embedding": (float_ids_to_embedding, TypeError, r"Embedding\(10, 4\): expected integer ids, got dtype float32"),
    "integer x to Dense": (integer_x_to_dense, TypeError, r"Dense\(10\): expected a floating-point x, got dtype int32"),
    "NaN in data": (nan_in_data, ValueError, r"x_train \(6, 3\) holds 1 non-finite value.*index \(2, 1\)"),
    "Inf in parameters": (inf_in_parameters, FloatingPointError, r"non-finite (loss|\[\d\]\['[Wb]'\])"),
    "empty batch": (empty_batch, ValueError, r"the batch is empty \(x has shape \(0, 5\)\)"),
    "labels out of range": (labels_out_of_range, ValueError, r"labels must lie in \[0, 3\), got values in \[0, 3\]"),
    "x/y batch mismatch": (mismatched_x_y, ValueError, r"same batch size, got x \(8, 5\) \(batch 8\) and y \(7,\) \(batch 7\)"),
    "wrong target shape": (wrong_target_shape, ValueError, r"MSE: expected target of shape \(4, 2\), got \(4, 3\)"),
    "unknown layer option": (unknown_layer_option, ValueError, r"padding must be 'SAME' or 'VALID', got 'FULL'"),
    "unknown initializer": (unknown_init, ValueError, r"weight_init must be one of \['glorot', 'he', 'lecun'\], got 'xavier'"),
    "bad dropout rate": (bad_dropout_rate, ValueError, r"Dropout: rate must be in \[0, 1\), got 1.5"),
    "unknown grad mode": (unknown_grad_mode, ValueError, r"grad must be one of .*got 'backprop'"),
    "params for another model": (wrong_params_for_model, ValueError, r"expected params as a list of 3, got 2"),
    "malformed data file": (malformed_data_file, ValueError, r"bad magic number 0x00000903 in .*expected 0x00000803"),
    "missing data set": (missing_data_set, FileNotFoundError, r"MNIST: data folder .*nowhere does not exist"),
    "missing checkpoint folder": (missing_checkpoint_folder, FileNotFoundError, r"--resume: no checkpoint folder .*checkpoints"),
    "truncated checkpoint": (truncated_checkpoint, checkpoint.CheckpointError, r"truncated or corrupt"),
    "checkpoint from another model": (checkpoint_from_another_model, checkpoint.CheckpointError, r"different model.*\(5, 8\).*\(5, 16\)"),
    # issue 13: unclear or silent before
    "params leaf of the wrong shape": (wrong_shape_params_leaf, ValueError, r"Sequential\(3 layers\): params\[2\]\['b'\] \(in \[2\] Dense\(3\)\) has shape \(7,\), but init makes \(3,\) for x of shape \(4, 5\)"),
    "integer params": (integer_params, TypeError, r"params\[0\]\['W'\] \(in \[0\] Dense\(8\)\) has dtype int32, expected a floating-point array"),
    "list of layers as the model": (list_as_model, TypeError, r"make_train_step: expected a layer .*got a list.*put the layers in fbp.Sequential\(\[\.\.\.\]\)"),
    "optimizer not from optax": (optimizer_not_from_optax, TypeError, r"make_train_step: expected an optax GradientTransformation.*got function; did you forget to call it: adam\(learning_rate\)\?"),
    "non-integer Embedding size": (non_integer_embedding_size, ValueError, r"Embedding: num_embeddings must be a positive int, got 5.5"),
    "LeakyReLU slope as a string": (string_leaky_relu_slope, TypeError, r"LeakyReLU: negative_slope must be a number, got '0.1' \(str\)"),
    "NaN in labels": (nan_in_labels, ValueError, r"check_gradients: y \(4, 2\) holds 1 non-finite value\(s\).*index \(2, 1\).*it is the data that is wrong"),
    "negative id in data": (negative_id_in_data, ValueError, r"toy: x_train \(6, 4\) holds 1 value\(s\) outside \[0, 11\), the first -1 at index \(2, 1\)"),
    "probabilities not summing to 1": (probabilities_not_summing_to_one, ValueError, r"SoftmaxCrossEntropy: probability targets must be >= 0 and sum to 1 .*summing to 2 .*at index \(1,\)"),
    "BCE target outside [0, 1]": (bce_target_out_of_range, ValueError, r"BinaryCrossEntropy: targets must lie in \[0, 1\], got values in \[1, 2\]"),
    "negative LayerNorm epsilon": (negative_layernorm_epsilon, ValueError, r"LayerNorm: epsilon must be a positive number .*got -1"),
    "LayerNorm over no features": (layernorm_over_no_features, ValueError, r"LayerNorm\(\): expected at least one feature to normalise over, got x of shape \(4, 0\)"),
    "TrainState of None": (train_state_of_none, TypeError, r"TrainState.create: params is None; pass the params that model.init\(key, x\) returned"),
    "negative noise multiplier": (negative_noise_multiplier, ValueError, r"make_train_step: noise_multiplier must be a number >= 0, got -1"),
}


@pytest.mark.parametrize("label", sorted(CASES))
def test_bad_input_gets_a_clear_error(label, tmp_path):
    make_bad_call, error, message = CASES[label]
    takes_path = make_bad_call.__code__.co_argcount == 1
    with pytest.raises(error, match=re.compile(message, re.DOTALL)):
        make_bad_call(tmp_path) if takes_path else make_bad_call()


def test_shape_errors_are_raised_at_trace_time():
    """Under jax.jit the same message comes while tracing, before XLA sees a shape."""
    with pytest.raises(ValueError, match=r"Dense\(10\): expected x\[\.\.\., 784\]"):
        jax.jit(fbp.Dense(10).apply)(_dense_params(), jnp.zeros((32, 785)))


def test_an_embedding_id_out_of_range_under_jit_never_updates_another_row():
    """Inside the jitted step ids cannot raise: -1 (which NumPy indexing wraps to the last row) or 10 looks up
    NaN, the loss is NaN, the step is skipped (metrics["finite"] False) and every parameter stays as it was."""
    model = fbp.Sequential([fbp.Embedding(10, 4), fbp.Flatten(num_axes=2), fbp.Dense(3)])
    ids = jnp.array([[1, 2], [3, -1], [4, 5], [6, 7]])
    params = model.init(KEY, jnp.zeros((4, 2), jnp.int32))
    state = fbp.TrainState.create(params, optax.sgd(0.1))
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optax.sgd(0.1), donate=False)
    for bad in (ids, ids.at[1, 1].set(10)):
        new_state, metrics = step(state, bad, jnp.array([0, 1, 2, 0]))
        assert not bool(metrics["finite"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.params, state.params)
    _, metrics = step(state, ids.at[1, 1].set(9), jnp.array([0, 1, 2, 0]))
    assert bool(metrics["finite"])  # the same batch with the id in range trains


def test_readme_table_lists_every_case():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    rows.discard("bad input")
    assert rows == set(CASES)
    assert len(CASES) >= 15
