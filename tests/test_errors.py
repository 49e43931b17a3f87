"""Bad input gives a ValueError / TypeError that names the layer, what was expected and what came.

Every case runs eagerly and under jax.jit: shapes and dtypes are static, so the
error comes at trace time, before XLA sees anything. Value checks (ids or labels
out of range) need concrete values and run eagerly only.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import fbp

KEY = jax.random.PRNGKey(0)
DENSE = fbp.Dense(4)
DENSE_PARAMS = DENSE.init(KEY, jax.ShapeDtypeStruct((2, 3), jnp.float32))
CONV = fbp.Conv2D(2)
CONV_PARAMS = CONV.init(KEY, jax.ShapeDtypeStruct((1, 5, 5, 3), jnp.float32))
LAYER_NORM = fbp.LayerNorm()
LAYER_NORM_PARAMS = LAYER_NORM.init(KEY, jax.ShapeDtypeStruct((2, 3), jnp.float32))
EMBEDDING = fbp.Embedding(10, 4)
EMBEDDING_PARAMS = EMBEDDING.init(KEY, jax.ShapeDtypeStruct((2,), jnp.int32))
MLP = fbp.Sequential([fbp.Dense(3), fbp.Tanh(), fbp.Dense(2)])
MLP_PARAMS = MLP.init(KEY, jax.ShapeDtypeStruct((4, 5), jnp.float32))


@dataclass(frozen=True)
class ErrorCase:
    """``function(*args)`` must raise ``error`` with a message matching ``match`` (a literal)."""

    name: str
    function: Callable
    args: tuple[Any, ...]
    error: type
    match: str
    traceable: bool = True  # False: a value check, needs concrete arrays


def ones(*shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


ERROR_CASES = [
    # wrong feature width
    ErrorCase("dense-width", lambda x: DENSE.apply(DENSE_PARAMS, x), (ones(2, 5),), ValueError,
              "Dense(4): expected x[..., 3], got shape (2, 5)"),
    ErrorCase("dense-image", lambda x: DENSE.apply(DENSE_PARAMS, x), (ones(2, 4, 4, 1),), ValueError,
              "Dense(4): expected x[..., 3], got shape (2, 4, 4, 1); did you forget Flatten()?"),
    ErrorCase("layernorm-width", lambda x: LAYER_NORM.apply(LAYER_NORM_PARAMS, x), (ones(2, 5),), ValueError,
              "LayerNorm(): expected x[..., 3], got shape (2, 5)"),
    ErrorCase("conv-channels", lambda x: CONV.apply(CONV_PARAMS, x), (ones(2, 5, 5, 1),), ValueError,
              "Conv2D(2): expected x[..., H, W, 3] (NHWC), got shape (2, 5, 5, 1)"),
    ErrorCase("sequential-inner-width", lambda x: MLP.apply(MLP_PARAMS, x), (ones(4, 6),), ValueError,
              "Dense(3): expected x[..., 5], got shape (4, 6)"),
    # wrong rank
    ErrorCase("dense-scalar", lambda x: DENSE.apply(DENSE_PARAMS, x), (ones(),), ValueError,
              "Dense(4): expected x of rank >= 1, got shape ()"),
    ErrorCase("conv-rank", lambda x: CONV.apply(CONV_PARAMS, x), (ones(5, 5),), ValueError,
              "Conv2D(2): expected x of rank >= 3, got shape (5, 5)"),
    ErrorCase("maxpool-rank", lambda x: fbp.MaxPool2D(2).apply({}, x), (ones(4, 4),), ValueError,
              "MaxPool2D(): expected x of rank >= 3, got shape (4, 4)"),
    ErrorCase("avgpool-too-small", lambda x: fbp.AvgPool2D(3).apply({}, x), (ones(2, 2, 2, 1),), ValueError,
              "AvgPool2D(window=3): image (2, 2) is smaller than the window (3, 3)"),
    ErrorCase("softmax-scalar", lambda x: fbp.Softmax().apply({}, x), (ones(),), ValueError,
              "Softmax(): expected x of rank >= 1, got shape ()"),
    ErrorCase("flatten-rank", lambda x: fbp.Flatten().apply({}, x), (ones(3, 4),), ValueError,
              "Flatten(): expected x of rank >= 3, got shape (3, 4)"),
    ErrorCase("residual-changes-shape", lambda x: fbp.Residual(fbp.Dense(3)).init(KEY, x), (ones(2, 4),),
              ValueError, "Residual(Dense(3)): the block must keep the shape, got x (2, 4) -> (2, 3)"),
    ErrorCase("sequential-params", lambda x: MLP.apply(MLP_PARAMS[:2], x), (ones(4, 5),), ValueError,
              "Sequential(3 layers): expected params as a list of 3, got 2"),
    # wrong dtype
    ErrorCase("embedding-float-ids", lambda x: EMBEDDING.apply(EMBEDDING_PARAMS, x), (ones(2, 3),), TypeError,
              "Embedding(10, 4): expected integer ids, got dtype float32"),
    ErrorCase("dense-integer-x", lambda x: DENSE.apply(DENSE_PARAMS, x), (ones(2, 3, dtype=jnp.int32),),
              TypeError, "Dense(4): expected a floating-point x, got dtype int32"),
    ErrorCase("cross-entropy-integer-logits", lambda z, t: fbp.SoftmaxCrossEntropy()(z, t),
              (ones(4, 3, dtype=jnp.int32), jnp.array([0, 1, 2, 0])), TypeError,
              "SoftmaxCrossEntropy: expected floating-point predictions, got int32"),
    # out of range, where the values are known
    ErrorCase("embedding-ids-out-of-range", lambda x: EMBEDDING.apply(EMBEDDING_PARAMS, x), (jnp.array([0, 12]),),
              ValueError, "Embedding(10, 4): ids must lie in [0, 10), got values in [0, 12]", traceable=False),
    ErrorCase("embedding-negative-ids", lambda x: EMBEDDING.apply(EMBEDDING_PARAMS, x), (jnp.array([-1, 2]),),
              ValueError, "Embedding(10, 4): ids must lie in [0, 10), got values in [-1, 2]", traceable=False),
    ErrorCase("labels-out-of-range", lambda z, t: fbp.SoftmaxCrossEntropy()(z, t),
              (ones(4, 3), jnp.array([0, 1, 2, 3])), ValueError,
              "SoftmaxCrossEntropy: labels must lie in [0, 3), got values in [0, 3]", traceable=False),
    ErrorCase("probabilities-negative", lambda z, t: fbp.SoftmaxCrossEntropy()(z, t),
              (ones(2, 3), jnp.array([[1.5, -0.5, 0.0], [0.0, 1.0, 0.0]])), ValueError,
              "SoftmaxCrossEntropy: probability targets must be >= 0 and sum to 1 over the last axis, got a row "
              "summing to 1 (min -0.5) at index (0,)", traceable=False),
    ErrorCase("bce-target-nan", lambda z, t: fbp.BinaryCrossEntropy()(z, t),
              (ones(2, 1), jnp.array([[jnp.nan], [0.5]])), ValueError,
              "BinaryCrossEntropy: targets must lie in [0, 1], got values in [0.5, 0.5] and NaN", traceable=False),
    # no features to normalise over: caught where the shape is known, at trace time
    ErrorCase("layernorm-no-features", lambda x: LAYER_NORM.init(KEY, x), (ones(2, 0),), ValueError,
              "LayerNorm(): expected at least one feature to normalise over, got x of shape (2, 0)"),
    # mismatched batch sizes between x and y
    ErrorCase("batch-mismatch-per-example", lambda x, y: fbp.value_and_grad(MLP, fbp.MSE(), per_example=True)(
        MLP_PARAMS, x, y), (ones(4, 5), ones(3, 2)), ValueError,
        "Sequential(3 layers): x and y must have the same batch size, got x (4, 5) (batch 4) and y (3, 2) (batch 3)"),
    ErrorCase("batch-mismatch-per-example-grads", lambda x, y: fbp.per_example_grads(MLP, fbp.MSE())(
        MLP_PARAMS, x, y), (ones(4, 5), jnp.array([0, 1, 1])), ValueError,
        "x and y must have the same batch size, got x (4, 5) (batch 4) and y (3,) (batch 3)"),
    # the batch gradient has no example axis to compare; the loss sees pred (4, 2) against y
    ErrorCase("batch-mismatch-batch-gradient", lambda x, y: fbp.value_and_grad(MLP, fbp.MSE())(MLP_PARAMS, x, y),
              (ones(4, 5), ones(3, 2)), ValueError, "MSE: expected target of shape (4, 2), got (3, 2)"),
    # a loss given the wrong target shape
    ErrorCase("mse-target", lambda z, t: fbp.MSE()(z, t), (ones(4, 3), ones(4, 2)), ValueError,
              "MSE: expected target of shape (4, 3), got (4, 2)"),
    ErrorCase("bce-target", lambda z, t: fbp.BinaryCrossEntropy()(z, t), (ones(4, 1), ones(4)), ValueError,
              "BinaryCrossEntropy: expected targets of shape (4, 1), got (4,)"),
    ErrorCase("cross-entropy-label-shape", lambda z, t: fbp.SoftmaxCrossEntropy()(z, t),
              (ones(4, 3), jnp.array([0, 1, 2])), ValueError,
              "SoftmaxCrossEntropy: integer labels must have shape (4,) for logits (4, 3), got (3,)"),
    ErrorCase("cross-entropy-probabilities-shape", lambda z, t: fbp.SoftmaxCrossEntropy()(z, t),
              (ones(4, 3), ones(4, 4)), ValueError,
              "SoftmaxCrossEntropy: expected integer labels (4,) or probabilities (4, 3), got shape (4, 4)"),
]

RUNS = [pytest.param(case, lambda f: f, id=f"{case.name}-eager") for case in ERROR_CASES] + [
    pytest.param(case, jax.jit, id=f"{case.name}-jit") for case in ERROR_CASES if case.traceable
]


@pytest.mark.parametrize(("case", "wrap"), RUNS)
def test_bad_input_raises_a_clear_error(case, wrap):
    with pytest.raises(case.error, match=re.escape(case.match)):
        wrap(case.function)(*case.args)

