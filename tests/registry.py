"""The test registry: every public layer and loss, with example inputs and numpy references.

``CASES`` maps each public layer class to its test cases; ``LOSS_CASES`` does the
same for losses. Adding a layer to fbp without a case here fails the guard test
in test_layers.py. The references are written in numpy from the formulas, never
by calling the layer, so a wrong forward cannot agree with itself.

Planted-bug layers (``WrongTanh``, ``ScaledBackward``) are data too: tests use
them to show that the checks catch a wrong backward. ``ParallelSum`` is a combinator
written from the layer protocol alone (not derived from fbp.Layer), as a user would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fbp

# input shapes: no batch axis, batch 1, batch 7, two leading axes
LEADS = {"single": (), "batch1": (1,), "batch7": (7,), "lead2x3": (2, 3)}


def array(values, dtype) -> jax.Array:
    """A jax array of ``values`` in ``dtype`` (as canonicalised by the x64 setting).

    The cast happens in numpy: jnp.asarray(values, dtype) would cast on the device,
    which compiles a kernel for every new shape.
    """
    return jnp.asarray(np.asarray(values, jax.dtypes.canonicalize_dtype(dtype)))


# --- layers ----------------------------------------------------------------


@dataclass(frozen=True)
class LayerCase:
    """One layer to test.

    Attributes:
      name: the test id.
      layer: the layer.
      feature_shape: the input is ``(*lead, *feature_shape)``.
      with_key: run forward with a PRNG key (Dropout's training mode).
      vocabulary: integer ids in ``[0, vocabulary)`` instead of normal floats.
    """

    name: str
    layer: Any
    feature_shape: tuple[int, ...]
    with_key: bool = False
    vocabulary: int | None = None

    def make_input(self, rng: np.random.Generator, lead: tuple[int, ...], dtype) -> jax.Array:
        shape = (*lead, *self.feature_shape)
        if self.vocabulary is not None:
            return array(rng.integers(0, self.vocabulary, shape), np.int64)
        return array(rng.standard_normal(shape), dtype)

    def layer_key(self) -> jax.Array | None:
        return jax.random.PRNGKey(42) if self.with_key else None


def _cases(*cases: LayerCase) -> tuple[LayerCase, ...]:
    return cases


CASES: dict[type, tuple[LayerCase, ...]] = {
    fbp.Dense: _cases(
        LayerCase("Dense", fbp.Dense(4), (3,)),
        LayerCase("Dense-nobias-he", fbp.Dense(2, use_bias=False, weight_init="he"), (5,)),
    ),
    fbp.ReLU: _cases(LayerCase("ReLU", fbp.ReLU(), (3,))),
    fbp.LeakyReLU: _cases(LayerCase("LeakyReLU", fbp.LeakyReLU(0.2), (3,))),
    fbp.Sigmoid: _cases(LayerCase("Sigmoid-scalar", fbp.Sigmoid(), ())),  # no batch axis: x of shape ()
    fbp.Tanh: _cases(LayerCase("Tanh", fbp.Tanh(), (3,))),
    fbp.GELU: _cases(LayerCase("GELU", fbp.GELU(), (3,))),
    fbp.Softmax: _cases(LayerCase("Softmax", fbp.Softmax(), (4,))),
    fbp.LogSoftmax: _cases(LayerCase("LogSoftmax", fbp.LogSoftmax(), (4,))),
    fbp.LayerNorm: _cases(LayerCase("LayerNorm", fbp.LayerNorm(), (5,))),
    fbp.Dropout: _cases(
        LayerCase("Dropout-nokey", fbp.Dropout(0.5), (6,)),
        LayerCase("Dropout-key", fbp.Dropout(0.5), (6,), with_key=True),
    ),
    fbp.Flatten: _cases(LayerCase("Flatten", fbp.Flatten(), (3, 2, 2))),  # num_axes=2: Sequential-embedding
    fbp.Conv2D: _cases(
        LayerCase("Conv2D-same", fbp.Conv2D(3, kernel_size=3), (5, 5, 2)),
        LayerCase("Conv2D-valid-stride2", fbp.Conv2D(2, kernel_size=(3, 2), stride=2, padding="VALID"), (6, 5, 2)),
        LayerCase("Conv2D-same-stride2", fbp.Conv2D(2, kernel_size=2, stride=(2, 3), use_bias=False), (5, 7, 1)),
    ),
    # pools: stride = window with a leftover row; overlapping windows with a leftover column
    fbp.MaxPool2D: _cases(
        LayerCase("MaxPool2D", fbp.MaxPool2D(2), (5, 4, 2)),
        LayerCase("MaxPool2D-overlap", fbp.MaxPool2D((2, 3), stride=(1, 2)), (4, 6, 2)),
    ),
    fbp.AvgPool2D: _cases(LayerCase("AvgPool2D-overlap", fbp.AvgPool2D(3, stride=(1, 2)), (4, 6, 2))),
    fbp.Embedding: _cases(LayerCase("Embedding", fbp.Embedding(6, 3), (4,), vocabulary=6)),
    fbp.Sequential: _cases(
        LayerCase("Sequential-mlp", fbp.Sequential([fbp.Dense(5), fbp.Tanh(), fbp.Dense(2)]), (3,)),
        LayerCase(
            "Sequential-dropout-key",
            fbp.Sequential([fbp.Dense(4), fbp.Dropout(0.3), fbp.Tanh(), fbp.Dropout(0.5)]),
            (3,),
            with_key=True,
        ),
        LayerCase(
            "Sequential-embedding",
            fbp.Sequential([fbp.Embedding(5, 2), fbp.Flatten(num_axes=2), fbp.Dense(2)]),
            (3,),
            vocabulary=5,
        ),
    ),
    fbp.Residual: _cases(
        LayerCase("Residual-layernorm", fbp.Residual(fbp.Sequential([fbp.LayerNorm(), fbp.Dense(3)])), (3,)),
        LayerCase("Residual-dropout-key", fbp.Residual(fbp.Dropout(0.5)), (4,), with_key=True),
    ),
}

ALL_CASES: list[LayerCase] = [case for cases in CASES.values() for case in cases]


def public_layer_classes() -> set[type]:
    """Every class exported by fbp that follows the layer protocol (init/apply/forward/backward)."""
    exported = (getattr(fbp, name) for name in fbp.__all__)
    return {
        obj
        for obj in exported
        if isinstance(obj, type)
        and obj is not fbp.Layer
        and not getattr(obj, "_is_protocol", False)  # fbp.LayerProtocol states the methods, it is no layer
        and all(callable(getattr(obj, method, None)) for method in ("init", "apply", "forward", "backward"))
    }


def make_params(layer, x: jax.Array, rng: np.random.Generator, dtype):
    """Params shaped as ``layer.init`` makes them, filled with N(0, 1) / sqrt(fan-in) in ``dtype``.

    Random rather than initial values, so that zero biases and unit scales do not hide a
    wrong gradient; numpy draws them because eager jax.random compiles a kernel per shape.
    """
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    fan_in = lambda shape: math.prod(shape[:-1]) if len(shape) > 1 else 1
    return jax.tree_util.tree_map(
        lambda s: array(rng.standard_normal(s.shape) / math.sqrt(fan_in(s.shape)), dtype), shapes
    )


# --- numpy references for the forward passes ---------------------------------


def _windows(x: np.ndarray, window, stride, out_hw):
    """Yield, for every offset (i, j) in the window, x[..., i + s a, j + s b, :] over (a, b)."""
    (sh, sw), (ho, wo) = stride, out_hw
    for i in range(window[0]):
        for j in range(window[1]):
            yield (i, j), x[..., i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv(layer, params, x):
    W = np.asarray(params["W"], np.float64)
    (kh, kw), (sh, sw) = W.shape[:2], _pair(layer.stride)
    h, w = x.shape[-3:-1]
    if layer.padding == "SAME":  # output ceil(n / s); the odd pad goes after (TensorFlow's rule)
        pads = []
        for n, k, s in ((h, kh, sh), (w, kw, sw)):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0)] * (x.ndim - 3) + pads + [(0, 0)])
    out_hw = ((x.shape[-3] - kh) // sh + 1, (x.shape[-2] - kw) // sw + 1)
    y = sum(patch @ W[i, j] for (i, j), patch in _windows(x, (kh, kw), (sh, sw), out_hw))
    return y + np.asarray(params["b"], np.float64) if layer.use_bias else y


def _pool(layer, x, reduce):
    window = _pair(layer.window)
    stride = window if layer.stride is None else _pair(layer.stride)
    h, w = x.shape[-3:-1]
    out_hw = ((h - window[0]) // stride[0] + 1, (w - window[1]) // stride[1] + 1)
    return reduce(np.stack([patch for _, patch in _windows(x, window, stride, out_hw)]), axis=0)


def _layer_norm(layer, params, x):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + layer.epsilon)
    return xhat * np.asarray(params["scale"], np.float64) + np.asarray(params["bias"], np.float64)


def _dropout(layer, x, key):
    if key is None:
        return x
    keep = np.asarray(jax.random.uniform(key, x.shape, jnp.float32) < 1.0 - layer.rate)  # the mask, drawn as the layer does
    return x * keep / (1.0 - layer.rate)


def _sequential(layer, params, x, key):
    keys = [None] * len(layer.layers) if key is None else list(jax.random.split(key, len(layer.layers)))
    for child, p, k in zip(layer.layers, params, keys):
        x = reference_forward(child, p, x, k)
    return x


def _log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_REFERENCES: dict[type, Callable] = {
    fbp.Dense: lambda layer, p, x, key: x @ np.asarray(p["W"], np.float64)
    + (np.asarray(p["b"], np.float64) if layer.use_bias else 0.0),
    fbp.ReLU: lambda layer, p, x, key: np.maximum(x, 0.0),
    fbp.LeakyReLU: lambda layer, p, x, key: np.where(x > 0, x, layer.negative_slope * x),
    fbp.Sigmoid: lambda layer, p, x, key: 1.0 / (1.0 + np.exp(-x)),
    fbp.Tanh: lambda layer, p, x, key: np.tanh(x),
    fbp.GELU: lambda layer, p, x, key: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    fbp.Softmax: lambda layer, p, x, key: np.exp(_log_softmax(x)),
    fbp.LogSoftmax: lambda layer, p, x, key: _log_softmax(x),
    fbp.LayerNorm: lambda layer, p, x, key: _layer_norm(layer, p, x),
    fbp.Dropout: lambda layer, p, x, key: _dropout(layer, x, key),
    fbp.Flatten: lambda layer, p, x, key: x.reshape(*x.shape[: x.ndim - layer.num_axes], -1),
    fbp.Conv2D: lambda layer, p, x, key: _conv(layer, p, x),
    fbp.MaxPool2D: lambda layer, p, x, key: _pool(layer, x, np.max),
    fbp.AvgPool2D: lambda layer, p, x, key: _pool(layer, x, np.mean),
    fbp.Embedding: lambda layer, p, x, key: np.asarray(p["W"], np.float64)[x],
    fbp.Sequential: _sequential,
    fbp.Residual: lambda layer, p, x, key: x + reference_forward(layer.block, p, x, key),
}


def reference_forward(layer, params, x, key=None) -> np.ndarray:
    """The layer's output computed in float64 numpy from its formula."""
    x = np.asarray(x) if np.issubdtype(np.asarray(x).dtype, np.integer) else np.asarray(x, np.float64)
    return _REFERENCES[type(layer)](layer, params, x, key)


# --- losses ----------------------------------------------------------------


@dataclass(frozen=True)
class LossCase:
    """One loss to test: ``pred: (*lead, *pred_shape)``; targets from ``make_target``.

    Attributes:
      make_target: ``(rng, lead, dtype) -> target`` (numpy draws: eager jax.random would
        compile a kernel per shape).
      reference: ``(pred, target) -> value`` in float64 numpy.
    """

    name: str
    loss: Any
    pred_shape: tuple[int, ...]
    make_target: Callable[[np.random.Generator, tuple[int, ...], Any], jax.Array]
    reference: Callable[[np.ndarray, np.ndarray], float]

    def make_pred(self, rng: np.random.Generator, lead: tuple[int, ...], dtype) -> jax.Array:
        return array(2.0 * rng.standard_normal((*lead, *self.pred_shape)), dtype)


NUM_CLASSES = 4


def _cross_entropy_reference(logits, probs):
    """Mean over examples of -sum_c t_c log softmax(z)_c; one example when there is no batch axis."""
    return float(np.mean(-(probs * _log_softmax(logits)).sum(axis=-1)))


def _bce_reference(z, t):
    p = 1.0 / (1.0 + np.exp(-z))
    return float(np.mean(-t * np.log(p) - (1 - t) * np.log(1 - p)))


def _probabilities(rng, lead, dtype):
    return array(np.exp(_log_softmax(rng.standard_normal((*lead, NUM_CLASSES)))), dtype)


LOSS_CASES: dict[type, tuple[LossCase, ...]] = {
    fbp.MSE: (
        LossCase(
            "MSE",
            fbp.MSE(),
            (3,),
            lambda rng, lead, dtype: array(rng.standard_normal((*lead, 3)), dtype),
            lambda pred, target: float(np.mean((pred - target) ** 2)),
        ),
    ),
    fbp.SoftmaxCrossEntropy: (
        LossCase(
            "SoftmaxCrossEntropy-labels",
            fbp.SoftmaxCrossEntropy(),
            (NUM_CLASSES,),
            lambda rng, lead, dtype: array(rng.integers(0, NUM_CLASSES, lead), np.int64),
            lambda logits, labels: _cross_entropy_reference(logits, np.eye(NUM_CLASSES)[labels]),
        ),
        LossCase(
            "SoftmaxCrossEntropy-probabilities", fbp.SoftmaxCrossEntropy(), (NUM_CLASSES,), _probabilities,
            _cross_entropy_reference,
        ),
    ),
    fbp.BinaryCrossEntropy: (
        LossCase(
            "BinaryCrossEntropy-hard",
            fbp.BinaryCrossEntropy(),
            (3,),
            lambda rng, lead, dtype: array(rng.integers(0, 2, (*lead, 3)), dtype),
            _bce_reference,
        ),
        LossCase(
            "BinaryCrossEntropy-soft",
            fbp.BinaryCrossEntropy(),
            (3,),
            lambda rng, lead, dtype: array(rng.uniform(size=(*lead, 3)), dtype),
            _bce_reference,
        ),
    ),
}

ALL_LOSS_CASES: list[LossCase] = [case for cases in LOSS_CASES.values() for case in cases]


# --- planted bugs ------------------------------------------------------------


@dataclass(frozen=True)
class WrongTanh(fbp.Tanh):
    """Tanh whose backward forgets the square: dx = dy (1 - y) instead of dy (1 - y^2)."""

    def backward(self, params, y, dy):
        return {}, dy * (1 - y)


@dataclass(frozen=True)
class ScaledBackward(fbp.Layer):
    """``inner`` with its backward scaled by ``factor``: proves which backward a transformation used."""

    inner: Any
    factor: float = 3.0

    def init(self, key, x):
        return self.inner.init(key, x)

    def forward(self, params, x, *, key=None):
        return self.inner.forward(params, x, key=key)

    def backward(self, params, cache, dy):
        dparams, dx = self.inner.backward(params, cache, dy)
        scale = lambda a: None if a is None else self.factor * a
        return jax.tree_util.tree_map(scale, dparams), scale(dx)


# --- a user-written combinator ------------------------------------------------


@dataclass(frozen=True)
class ParallelSum:
    """y = left(x) + right(x): a combinator written as a user would, from the protocol alone.

    Not derived from fbp.Layer or Sequential: it implements the four methods,
    takes ``key=`` (split in two, one per branch, with fbp's ``split_key``) and
    says what it is made of with ``children``, so the checker can search it.
    No per-example hooks: the per-example paths use the protocol's fallbacks.
    """

    left: Any
    right: Any

    def init(self, key, x):
        key_left, key_right = jax.random.split(key)
        return {"left": self.left.init(key_left, x), "right": self.right.init(key_right, x)}

    def children(self, params, x, *, key=None):
        key_left, key_right = fbp.split_key(key, 2)
        return [
            fbp.Child(".left", self.left, params["left"], x, key_left),
            fbp.Child(".right", self.right, params["right"], x, key_right),
        ]

    def apply(self, params, x, *, key=None):
        return sum(child.layer.apply(child.params, child.x, key=child.key) for child in self.children(params, x, key=key))

    def forward(self, params, x, *, key=None):
        (y_left, cache_left), (y_right, cache_right) = (
            child.layer.forward(child.params, child.x, key=child.key) for child in self.children(params, x, key=key)
        )
        return y_left + y_right, (cache_left, cache_right)

    def backward(self, params, cache, dy):
        # x feeds both branches: their dx add
        dleft, dx_left = self.left.backward(params["left"], cache[0], dy)
        dright, dx_right = self.right.backward(params["right"], cache[1], dy)
        return {"left": dleft, "right": dright}, dx_left + dx_right


def float_dtype_tolerance(dtype) -> dict[str, float]:
    """Tolerances for a float32 or float64 result against a reference.

    float32: eps 1.2e-7 times sums of up to ~20 O(1) terms (conv windows, dense rows) and
    a float64 reference: 1e-5 relative and absolute leaves a 4x margin. float64: the same
    argument with eps 2.2e-16 gives ~1e-14; 1e-11 allows transcendental functions that
    differ between numpy and XLA by a few ulps amplified by cancellation in LayerNorm.
    """
    return {"rtol": 1e-5, "atol": 1e-5} if jnp.dtype(dtype) == jnp.float32 else {"rtol": 1e-11, "atol": 1e-11}


# --- the sequence layers: cases, references and planted bugs live beside their families -------------------
# (imported last: those modules import LayerCase from here while they load)
import registry_attention
import registry_sequences

for _extra in (registry_sequences, registry_attention):
    for _cls, _cases in _extra.CASES.items():
        CASES[_cls] = CASES.get(_cls, ()) + _cases
_REFERENCES[fbp.Conv2D] = lambda layer, p, x, key: registry_sequences.reference_forward(layer, p, x)  # int padding
for _cls in registry_sequences.CASES:
    _REFERENCES.setdefault(_cls, lambda layer, p, x, key: registry_sequences.reference_forward(layer, p, x))
_REFERENCES.update(registry_attention.REFERENCES)
ALL_CASES = [case for cases in CASES.values() for case in cases]
