"""Planted backward bugs, as data: each must be caught by ``fbp.check_gradients``.

A mutant is a correct layer (or loss) whose ``backward`` (and, for a stale
cache, ``forward``; for a per-example hook bug, the hook) is replaced by a
buggy one: ``mutate`` makes a subclass of the layer's frozen dataclass with the
same fields and name, so the report reads as it would for the real bug.
``Stack`` (``SequenceStack`` for sequence models) builds the small model it
sits in: ``"*"`` marks the mutant's place (a loss mutant replaces the loss).

Adding a mutant is one line in ``MUTANTS``:

    Mutant(name, correct layer, buggy backward, Stack(...), wrong layer path, a wrong leaf)

``hidden`` says where the bug honestly does not show (e.g. ``{"batch": 1}`` for
mean-instead-of-sum, ``{"key": None}`` for a dropout bug without a key):
test_mutants checks that the checker passes it there, so the catch elsewhere
is not a checker that fails everything. The sequence and attention layers'
mutants live next to their cases (``registry_sequences``,
``registry_attention``); ``everything()`` is the whole list test_mutants runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import fbp
from fbp.layers.attention import MultiHeadAttention
from fbp.layers.base import per_example_bias_grads, per_example_bias_sq_norms, sum_leading
from fbp.layers.recurrent import SimpleRNN
from fbp.layers.windows import place


def mutate(layer, backward: Callable | None = None, forward: Callable | None = None, methods: dict | None = None):
    """``layer`` with ``backward`` / ``forward`` (and any ``methods``, by name) replaced: a same-named frozen
    dataclass subclass."""
    namespace = {name: fn for name, fn in (("backward", backward), ("forward", forward)) if fn is not None}
    namespace.update(methods or {})
    cls = dataclasses.dataclass(frozen=True)(type(type(layer).__name__, (type(layer),), namespace))
    return cls(**{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.init})


@dataclasses.dataclass(frozen=True)
class Stack:
    """A model around the mutant: ``Sequential(layers)`` with ``"*"`` replaced, and its loss and data.

    Attributes:
      layers: layers in order; ``"*"`` is where the mutant goes (none for a loss mutant).
      inputs: "vector" (batch, 5) ~ N(0, 1); "offset" the same plus 300 (a large mean);
        "image" (batch, 6, 6, 2); "ids" (batch, 4) integers in [0, 7) with a repeat in each row.
      loss: a loss instance (None: softmax cross-entropy), or "*" for the mutant itself.
      targets: "labels" (3 classes), "regression" (batch, 3) or "binary" (batch, 1).
    """

    layers: tuple
    inputs: str = "vector"
    loss: Any = None
    targets: str = "labels"

    def build(self, mutant, dtype: str = "float32", batch: int = 4, seed: int = 0):
        """``(model, loss, params, x, y)``; float64 needs ``jax.enable_x64``."""
        model = fbp.Sequential([mutant if layer == "*" else layer for layer in self.layers])
        loss = mutant if self.loss == "*" else self.loss or fbp.SoftmaxCrossEntropy()
        key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(seed), 3)
        x = _inputs(self.inputs, key_x, batch, jnp.dtype(dtype))
        if self.targets == "labels":
            y = jax.random.randint(key_y, (batch,), 0, 3)
        elif self.targets == "binary":
            y = jax.random.bernoulli(key_y, 0.5, (batch, 1)).astype(dtype)
        else:
            y = jax.random.normal(key_y, (batch, 3), dtype)
        return model, loss, model.init(key_params, x), x, y


@dataclasses.dataclass(frozen=True)
class SequenceStack:
    """``Stack`` for sequences: x ``(batch, time, features)`` ~ N(0, 1), labels in [0, 3).

    Attributes:
      layers: layers in order; ``"*"`` is where the mutant goes. The last gives 3 features.
      per_step: labels ``(batch, time)`` for a model that keeps the time axis, else ``(batch,)``.
      time, features: the shape of one example.
    """

    layers: tuple
    per_step: bool = True
    time: int = 4
    features: int = 3

    def build(self, mutant, dtype: str = "float32", batch: int = 4, seed: int = 0):
        """``(model, loss, params, x, y)``, as ``Stack.build``; float64 needs ``jax.enable_x64``."""
        model = fbp.Sequential([mutant if layer == "*" else layer for layer in self.layers])
        key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(seed), 3)
        x = jax.random.normal(key_x, (batch, self.time, self.features), jnp.dtype(dtype))
        y = jax.random.randint(key_y, (batch, self.time) if self.per_step else (batch,), 0, 3)
        params = model.init(key_params, x)
        # biases start at 0 and norm scales at 1: perturb every leaf so that none hides a wrong gradient
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.fold_in(key_params, 1), len(leaves))
        leaves = [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
        return model, fbp.SoftmaxCrossEntropy(), jax.tree_util.tree_unflatten(tree, leaves), x, y


def _inputs(kind: str, key, batch: int, dtype):
    if kind == "vector":
        return jax.random.normal(key, (batch, 5), dtype)
    if kind == "offset":
        return jax.random.normal(key, (batch, 5), dtype) + jnp.asarray(300, dtype)
    if kind == "image":
        return jax.random.normal(key, (batch, 6, 6, 2), dtype)
    ids = jax.random.randint(key, (batch, 4), 0, 7)
    return ids.at[:, -1].set(ids[:, 0])  # id repeated within each example


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug and where the report must point.

    Attributes:
      name: what the bug is.
      layer: the correct layer or loss the bug is planted in.
      backward: the buggy ``backward`` (a function of ``self`` like the method).
      model: the Stack it sits in.
      wrong_layer: the ``first_bad_path`` the report must give: ``"[1]"`` or ``"loss"``.
      wrong_leaf: a leaf the report must flag, e.g. ``"[0]['W']"``.
      forward: a buggy ``forward`` too (a stale cache), or None.
      dtype: the precision it is checked in.
      hidden: conditions (``batch``, ``dtype``, ``key``) under which the bug does not exist, or None.
      methods: other methods replaced, by name (a buggy per-example hook), or None.
      hook: the hook the report must name as the first wrong one (``first_bad_hook``), or None.
      random: the model draws random numbers: check it with a key (``KEY``).
    """

    name: str
    layer: Any
    backward: Callable | None
    model: Stack | SequenceStack
    wrong_layer: str
    wrong_leaf: str
    forward: Callable | None = None
    dtype: str = "float32"
    hidden: dict | None = None
    methods: dict | None = None
    hook: str | None = None
    random: bool = False

    def build(self, dtype: str | None = None, batch: int = 4, seed: int = 0):
        planted = mutate(self.layer, self.backward, self.forward, self.methods)
        return self.model.build(planted, dtype or self.dtype, batch, seed)

    def check(self, *, hidden: bool = False):
        """``fbp.check_gradients`` of the built model: as planted, or (``hidden``) where the bug does not show."""
        where = self.hidden if hidden else {}
        dtype = where.get("dtype", self.dtype)
        key = where.get("key", KEY) if self.random else None
        with jax.enable_x64(dtype == "float64"):
            return fbp.check_gradients(*self.build(dtype, where.get("batch", 4)), key=key)


KEY = jax.random.PRNGKey(7)  # the key a random mutant is checked with


# --- the buggy backward passes ----------------------------------------------


def _dense(x, dy):
    return x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])


def dense_dW_sign(self, params, x, dy):
    x2, dy2 = _dense(x, dy)
    return {"W": -(x2.T @ dy2), "b": dy2.sum(0)}, dy @ params["W"].T


def dense_dW_transposed(self, params, x, dy):
    x2, dy2 = _dense(x, dy)
    return {"W": dy2.T @ x2, "b": dy2.sum(0)}, dy @ params["W"].T  # square W: the shapes still match


def dense_db_mean(self, params, x, dy):
    x2, dy2 = _dense(x, dy)
    return {"W": x2.T @ dy2, "b": dy2.mean(0)}, dy @ params["W"].T


def dense_dx_sign(self, params, x, dy):
    x2, dy2 = _dense(x, dy)
    return {"W": x2.T @ dy2, "b": dy2.sum(0)}, -(dy @ params["W"].T)


def dense_dW_scaled(factor):
    def backward(self, params, x, dy):
        x2, dy2 = _dense(x, dy)
        return {"W": factor * (x2.T @ dy2), "b": dy2.sum(0)}, dy @ params["W"].T

    return backward


def dense_one_element(self, params, x, dy):
    x2, dy2 = _dense(x, dy)
    dW = (x2.T @ dy2).at[1, 2].multiply(1.01)
    return {"W": dW, "b": dy2.sum(0)}, dy @ params["W"].T


def dense_reshape_not_transpose(self, params, x, dy):
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(dy.shape[-1], -1).T  # right only when there is one row
    return {"W": x2.T @ dy2, "b": dy2.sum(0)}, dy @ params["W"].T


def tanh_no_derivative(self, params, y, dy):
    return {}, dy


def tanh_abs(self, params, y, dy):
    return {}, dy * (1 - y * jnp.abs(y))  # 1 - y^2 only where y >= 0


def sigmoid_half_derivative(self, params, y, dy):
    return {}, dy * y


def leaky_relu_no_slope(self, params, mask, dy):
    return {}, jnp.where(mask, dy, jnp.zeros_like(dy))  # negative inputs lose their slope


def gelu_missing_term(self, params, cache, dy):
    _, t = cache
    return {}, dy * 0.5 * (1 + t)  # the x * sech^2(u) * du/dx term is gone


def softmax_wrong_axis(self, params, y, dy):
    return {}, y * (dy - jnp.sum(dy * y, axis=0, keepdims=True))


def log_softmax_no_softmax_term(self, params, y, dy):
    return {}, dy


def _scaled(params, dy):
    return dy * jax.lax.broadcast_to_rank(params["scale"], dy.ndim)


def layernorm_missing_term(self, params, cache, dy):
    xhat, inv_std = cache
    g = _scaled(params, dy)
    dx = inv_std * (g - g.mean(axis=-1, keepdims=True))
    return {"scale": sum_leading(dy * xhat, 1), "bias": sum_leading(dy, 1)}, dx


def layernorm_wrong_axis(self, params, cache, dy):
    xhat, inv_std = cache
    g = _scaled(params, dy)
    dx = inv_std * (g - g.mean(axis=0, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return {"scale": sum_leading(dy * xhat, 1), "bias": sum_leading(dy, 1)}, dx


def layernorm_stale_forward(self, params, x, *, key=None):
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    inv_std = jax.lax.rsqrt((centered * centered).mean(axis=-1, keepdims=True) + self.epsilon)
    y = _scaled(params, centered * inv_std) + jax.lax.broadcast_to_rank(params["bias"], x.ndim)
    return y, (centered, inv_std)  # caches x - mean from before the division: not xhat


def layernorm_cache_x(self, params, x, *, key=None):
    return fbp.LayerNorm.forward(self, params, x)[0], x


def layernorm_naive_variance(self, params, x, dy):
    # recomputes the variance as E[x^2] - E[x]^2: cancels catastrophically in
    # float32 when |mean| >> std, harmless in float64
    mean = x.mean(axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt((x * x).mean(axis=-1, keepdims=True) - mean * mean + self.epsilon)
    return fbp.LayerNorm.backward(self, params, ((x - mean) * inv_std, inv_std), dy)


def layernorm_norms_from_x(self, params, x, dy):
    # the hook of a LayerNorm that caches x: (xhat, 1/std) recomputed from it, as the backward above does
    mean = x.mean(axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + self.epsilon)
    return fbp.LayerNorm.per_example_sq_norms(self, params, ((x - mean) * inv_std, inv_std), dy)


def _images(a):
    return a.reshape(-1, *a.shape[-3:])  # (..., H, W, C) -> (N, H, W, C)


def conv_dx_unflipped(self, params, x, dy):
    dparams, _ = fbp.Conv2D.backward(self, params, x, dy)
    kh, kw = self._kernel  # stride 1, "SAME": pads (k - 1) // 2 on each side
    W = jnp.swapaxes(params["W"], 2, 3)  # forgot [::-1, ::-1]
    pads = [((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)]
    dx = jax.lax.conv_general_dilated(_images(dy), W, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return dparams, dx.reshape(x.shape)


def conv_db_mean(self, params, x, dy):
    dparams, dx = fbp.Conv2D.backward(self, params, x, dy)
    return {**dparams, "b": _images(dy).mean(axis=(1, 2)).sum(axis=0)}, dx


def conv_dW_transposed(self, params, x, dy):
    dparams, dx = fbp.Conv2D.backward(self, params, x, dy)
    return {**dparams, "W": jnp.swapaxes(dparams["W"], 2, 3)}, dx  # in == out channels


def maxpool_everywhere(self, params, cache, dy):
    x, _ = cache
    dx = sum(place(_images(dy), (i, j), self._stride, x.shape[-3:-1]) for i in range(2) for j in range(2))
    return {}, dx.reshape(x.shape)  # dy to every element of the window, not only to the maximum


def avgpool_missing_scale(self, params, shape_record, dy):
    size = shape_record.shape[1:]
    dx = sum(place(_images(dy), (i, j), self._stride, size) for i in range(2) for j in range(2))
    return {}, dx.reshape(*dy.shape[:-3], *size, dy.shape[-1])


def residual_no_skip(self, params, cache, dy):
    return self.block.backward(params, cache, dy)  # dx = dx_block: the skip path's dy is dropped


def embedding_set_not_add(self, params, ids, dy):
    dW = jnp.zeros_like(params["W"]).at[ids.reshape(-1)].set(dy.reshape(-1, self.features))
    return {"W": dW}, None  # a repeated id keeps one of its gradients instead of their sum


def cross_entropy_no_mean_forward(self, logits, target):
    value, cache = fbp.SoftmaxCrossEntropy.forward(self, logits, target)
    return value, cache * (logits.size // logits.shape[-1])  # softmax - t, without the 1/m


def mse_no_factor_two(self, cache):
    return cache / 2


def bce_sign(self, cache):
    return -cache


def dropout_no_scale(self, params, scaled_mask, dy):
    return {}, dy if scaled_mask is None else dy * (scaled_mask > 0)  # the mask, without its 1/(1 - rate)


# --- buggy per-example hooks: the batch gradient is right, clipping is not ----------------
# Each bug is planted in the hook a train step runs on the layer (``call_per_example_backward``:
# per_example_backward where the layer has it, else per_example_sq_norms / per_example_weighted_grads),
# as a correction of the real hook's result, so it follows the layer's implementation.


def hook_bug(cls, *, sq_norms: Callable | None = None, weighted: Callable | None = None) -> tuple[dict, str]:
    """``(methods, hook)`` for a Mutant: ``sq_norms(self, cache, dy, right)`` / ``weighted(self, params, cache, dy,
    right)`` turn the right result into the buggy one, in the hook the step runs on ``cls``."""
    if callable(getattr(cls, "per_example_backward", None)):

        def per_example_backward(self, params, cache, dy):
            sq, dx, weighted_grads = cls.per_example_backward(self, params, cache, dy)
            if sq_norms is not None:
                sq = sq_norms(self, cache, dy, sq)
            if weighted is not None:
                return sq, dx, lambda w: weighted(self, params, cache, dy, weighted_grads(w))
            return sq, dx, weighted_grads

        return {"per_example_backward": per_example_backward}, "per_example_backward"
    if sq_norms is not None:

        def norms(self, params, cache, dy):
            return sq_norms(self, cache, dy, cls.per_example_sq_norms(self, params, cache, dy))

        return {"per_example_sq_norms": norms}, "per_example_sq_norms"

    def weighted_grads(self, params, cache, dy, weights):
        return weighted(self, params, cache, dy, cls.per_example_weighted_grads(self, params, cache, dy, weights))

    return {"per_example_weighted_grads": weighted_grads}, "per_example_weighted_grads"


def without_bias_norms(self, cache, dy, right):
    return right - per_example_bias_sq_norms(dy)  # ||db_i||^2 left out (a bias added at every position)


def bias_unweighted(self, params, cache, dy, right):
    return {**right, "b": per_example_bias_grads(dy).sum(axis=0)}  # sum_i db_i, not sum_i w_i db_i


def recurrent_unweighted(self, params, cache, dy, right):
    return {**right, "U": self.backward(params, cache, dy)[0]["U"]}  # sum_i dU_i, not sum_i w_i dU_i


_DENSE_HOOK = hook_bug(fbp.Dense, sq_norms=without_bias_norms)
_CONV_HOOK = hook_bug(fbp.Conv2D, weighted=bias_unweighted)
_RNN_HOOK = hook_bug(SimpleRNN, weighted=recurrent_unweighted)
_ATTENTION_HOOK = hook_bug(MultiHeadAttention, sq_norms=without_bias_norms)  # the output projection's bias


# --- the list ------------------------------------------------------------------

_MLP_FIRST = Stack(("*", fbp.Tanh(), fbp.Dense(3)))
_MLP_MIDDLE = Stack((fbp.Dense(6), "*", fbp.Dense(3)))
_MLP_LAST = Stack((fbp.Dense(6), fbp.Tanh(), "*"))
_IMAGE_SECOND = Stack((fbp.Conv2D(2), "*", fbp.Flatten(), fbp.Dense(3)), inputs="image")
_IMAGE_FIRST = Stack(("*", fbp.Tanh(), fbp.Flatten(), fbp.Dense(3)), inputs="image")
_REGRESSION = Stack((fbp.Dense(3), "*"), loss=fbp.MSE(), targets="regression")
_LOSS = Stack((fbp.Dense(6), fbp.Tanh(), fbp.Dense(3)), loss="*")
_RESIDUAL_BLOCK = fbp.Residual(fbp.Sequential([fbp.Dense(6), fbp.Tanh(), fbp.Dense(6)]))
_NO_BATCH = {"batch": 1}

# fmt: off
# one line each: name, correct layer, buggy backward, model, first wrong layer, a wrong leaf[, extras]
MUTANTS = [
    Mutant("dense: dW sign flipped", fbp.Dense(5), dense_dW_sign, _MLP_FIRST, "[0]", "[0]['W']"),
    Mutant("dense: dW transposed", fbp.Dense(5), dense_dW_transposed, _MLP_FIRST, "[0]", "[0]['W']"),
    Mutant("dense: db mean instead of sum", fbp.Dense(5), dense_db_mean, _MLP_FIRST, "[0]", "[0]['b']",
           hidden=_NO_BATCH),
    Mutant("dense: dx sign flipped", fbp.Dense(3), dense_dx_sign, _MLP_LAST, "[2]", "[0]['W']"),
    Mutant("dense: dW off by 1%", fbp.Dense(5), dense_dW_scaled(1.01), _MLP_FIRST, "[0]", "[0]['W']"),
    Mutant("dense: dW off by 0.1%", fbp.Dense(5), dense_dW_scaled(1.001), _MLP_FIRST, "[0]", "[0]['W']"),
    Mutant("dense: one element of dW off by 1%", fbp.Dense(5), dense_one_element, _MLP_FIRST, "[0]", "[0]['W']"),
    Mutant("dense: reshape instead of transpose (batch > 1 only)", fbp.Dense(5), dense_reshape_not_transpose,
           _MLP_FIRST, "[0]", "[0]['W']", hidden=_NO_BATCH),
    Mutant("tanh: derivative missing", fbp.Tanh(), tanh_no_derivative, _MLP_MIDDLE, "[1]", "[0]['W']"),
    Mutant("tanh: 1 - y|y| (negative inputs only)", fbp.Tanh(), tanh_abs, _MLP_MIDDLE, "[1]", "[0]['W']"),
    Mutant("sigmoid: (1 - y) factor missing", fbp.Sigmoid(), sigmoid_half_derivative, _MLP_MIDDLE, "[1]", "[0]['b']"),
    Mutant("leaky_relu: slope forgotten (negative inputs only)", fbp.LeakyReLU(0.1), leaky_relu_no_slope,
           _MLP_MIDDLE, "[1]", "[0]['W']"),
    Mutant("gelu: x sech^2 term missing", fbp.GELU(), gelu_missing_term, _MLP_MIDDLE, "[1]", "[0]['W']"),
    Mutant("softmax: sum over the batch axis", fbp.Softmax(), softmax_wrong_axis, _REGRESSION, "[1]", "[0]['W']"),
    Mutant("log_softmax: softmax term missing", fbp.LogSoftmax(), log_softmax_no_softmax_term, _REGRESSION, "[1]",
           "[0]['W']"),
    Mutant("layernorm: xhat mean(g xhat) term missing", fbp.LayerNorm(), layernorm_missing_term, _MLP_MIDDLE, "[1]",
           "[0]['W']"),
    Mutant("layernorm: mean over the wrong axis", fbp.LayerNorm(), layernorm_wrong_axis, _MLP_MIDDLE, "[1]",
           "[0]['W']"),
    Mutant("layernorm: stale cache (x - mean, not xhat)", fbp.LayerNorm(), None, _MLP_MIDDLE, "[1]", "[1]['scale']",
           forward=layernorm_stale_forward),
    Mutant("layernorm: naive variance (float32 only)", fbp.LayerNorm(), layernorm_naive_variance,
           Stack(("*", fbp.Dense(3)), inputs="offset"), "[0]", "[0]['scale']", forward=layernorm_cache_x,
           hidden={"dtype": "float64"}, methods={"per_example_sq_norms": layernorm_norms_from_x}),
    Mutant("conv2d: dx with the kernel unflipped", fbp.Conv2D(2), conv_dx_unflipped,
           Stack((fbp.Conv2D(2), fbp.Tanh(), "*", fbp.Flatten(), fbp.Dense(3)), inputs="image"), "[2]", "[0]['W']"),
    Mutant("conv2d: db mean over positions instead of sum", fbp.Conv2D(2), conv_db_mean, _IMAGE_FIRST, "[0]",
           "[0]['b']"),
    Mutant("conv2d: dW in/out channels swapped", fbp.Conv2D(2), conv_dW_transposed, _IMAGE_FIRST, "[0]", "[0]['W']"),
    Mutant("maxpool: dy to the whole window", fbp.MaxPool2D(2), maxpool_everywhere, _IMAGE_SECOND, "[1]", "[0]['W']"),
    Mutant("avgpool: 1/(kh kw) missing", fbp.AvgPool2D(2), avgpool_missing_scale, _IMAGE_SECOND, "[1]", "[0]['W']"),
    Mutant("residual: skip path dropped", _RESIDUAL_BLOCK, residual_no_skip,
           Stack((fbp.Dense(6), fbp.Tanh(), "*", fbp.Dense(3))), "[2]", "[0]['W']"),
    Mutant("embedding: set instead of add (repeated ids only)", fbp.Embedding(7, 3), embedding_set_not_add,
           Stack(("*", fbp.Flatten(num_axes=2), fbp.Dense(3)), inputs="ids"), "[0]", "[0]['W']"),
    Mutant("cross-entropy: 1/m missing", fbp.SoftmaxCrossEntropy(), None, _LOSS, "loss", "[2]['b']",
           forward=cross_entropy_no_mean_forward, hidden=_NO_BATCH),
    Mutant("mse: factor 2 missing", fbp.MSE(), mse_no_factor_two, dataclasses.replace(_LOSS, targets="regression"),
           "loss", "[2]['W']"),
    Mutant("binary cross-entropy: sign flipped", fbp.BinaryCrossEntropy(), bce_sign,
           Stack((fbp.Dense(6), fbp.Tanh(), fbp.Dense(1)), loss="*", targets="binary"), "loss", "[0]['W']"),
    Mutant("dropout: 1/(1 - rate) scale missing (with a key only)", fbp.Dropout(0.5), dropout_no_scale, _MLP_MIDDLE,
           "[1]", "[0]['W']", random=True, hidden={"key": None}),
    # per-example hooks: right batch gradients, wrong clipping; named by layer and hook
    Mutant("dense hook: per-example norm missing ||db_i||^2", fbp.Dense(5), None, _MLP_FIRST, "[0]", "[0] sq_norms",
           methods=_DENSE_HOOK[0], hook=_DENSE_HOOK[1]),
    Mutant("conv2d hook: weighted bias gradient ignores the weights", fbp.Conv2D(2), None, _IMAGE_FIRST, "[0]",
           "[0] weighted['b']", methods=_CONV_HOOK[0], hook=_CONV_HOOK[1]),
    Mutant("simple_rnn hook: weighted dU ignores the weights", SimpleRNN(4), None, SequenceStack(("*", fbp.Dense(3))),
           "[0]", "[0] weighted['U']", methods=_RNN_HOOK[0], hook=_RNN_HOOK[1]),
    Mutant("attention hook: per-example norm missing ||dbo_i||^2", MultiHeadAttention(2, causal=True), None,
           SequenceStack((fbp.Dense(6), "*", fbp.Dense(3)), time=5, features=4), "[1]", "[1] sq_norms",
           methods=_ATTENTION_HOOK[0], hook=_ATTENTION_HOOK[1]),
]
# fmt: on

# the planted bugs issue 3 names, tested in test_checker.py next to their correct twins
ISSUE_3 = {
    "wrong sign": "dense: dW sign flipped",
    "transposed dW": "dense: dW transposed",
    "missing 1/m": "cross-entropy: 1/m missing",
    "mean instead of sum for db": "dense: db mean instead of sum",
    "missing activation derivative": "tanh: derivative missing",
    "dropped residual path": "residual: skip path dropped",
}
BY_NAME = {m.name: m for m in MUTANTS}


def everything() -> list[Mutant]:
    """``MUTANTS`` and the sequence and attention layers' (``registry_sequences``, ``registry_attention``)."""
    import registry  # noqa: F401 - first: the two below need registry.LayerCase while they load
    import registry_attention
    import registry_sequences

    return MUTANTS + registry_sequences.MUTANTS + registry_attention.MUTANTS


def problems(mutant: Mutant, report) -> list[str]:
    """What is wrong with ``report`` as the verdict on ``mutant`` (empty: caught and named right)."""
    found = []
    if report.ok:
        found.append("not caught")
    if report.first_bad_path != mutant.wrong_layer:
        found.append(f"first wrong layer {report.first_bad_path}, expected {mutant.wrong_layer}")
    if mutant.wrong_leaf not in report.failed_leaves:
        found.append(f"leaf {mutant.wrong_leaf} not flagged")
    if mutant.hook is not None and not (report.first_bad_hook or "").endswith(f".{mutant.hook}"):
        found.append(f"first wrong hook {report.first_bad_hook}, expected {mutant.hook}")
    if mutant.wrong_layer != "loss":
        # gradients of the layers after the wrong one do not depend on the bug: none may be flagged
        # (rows of the whole model, "model ...", are no layer's)
        after = [
            p for p in report.failed_leaves if p.startswith("[") and _top_layer(p) > _top_layer(mutant.wrong_layer)
        ]
        found += [f"leaves after the wrong layer flagged: {after}"] if after else []
    return found


def _top_layer(path: str) -> int:
    """``"[2]['W']"`` or ``"[2].block[0]"`` -> 2."""
    return int(path[1 : path.index("]")])
