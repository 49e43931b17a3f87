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
from fbp.training.fit import TrainConfig, first_nonfinite, fit

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


def test_readme_table_lists_every_case():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    rows.discard("bad input")
    assert rows == set(CASES)
    assert len(CASES) >= 15
