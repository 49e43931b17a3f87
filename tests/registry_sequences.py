"""Test registry for the sequence layers (Conv1D, SimpleRNN, GRU, LSTM): cases, numpy references, planted bugs.

``CASES`` has the form of ``registry.CASES`` (layer class -> LayerCase tuple; the
Conv2D entry adds explicit-padding cases to registry's); ``reference_forward``
computes each layer in float64 numpy from its formula, with plain Python loops
over time, never by calling the layer; ``MUTANTS`` has the form of
``mutants.MUTANTS`` (planted backpropagation-through-time bugs in models built
by ``mutants.SequenceStack``), run by test_mutants with the rest.

Import ``registry`` before this module (it needs ``registry.LayerCase``).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from mutants import Mutant, SequenceStack
from registry import LayerCase

import fbp
from fbp.layers.conv import Conv1D, Conv2D
from fbp.layers.recurrent import GRU, LSTM, SimpleRNN

# --- cases -------------------------------------------------------------------
# feature_shape is (time, features) or (length, channels); lengths include 1, and differ from the widths

CASES: dict[type, tuple[LayerCase, ...]] = {
    Conv1D: (
        LayerCase("Conv1D-same", Conv1D(3), (6, 2)),
        LayerCase("Conv1D-valid-stride2-leftover", Conv1D(2, kernel_size=4, stride=2, padding="VALID"), (9, 2)),
        LayerCase("Conv1D-int-padding-stride2", Conv1D(2, stride=2, padding=1, use_bias=False), (7, 1)),
        LayerCase("Conv1D-low-high-stride3", Conv1D(2, kernel_size=2, stride=3, padding=(2, 0)), (8, 3)),
    ),
    # to be appended to registry.CASES[fbp.Conv2D]: padding as PyTorch gives it, and per axis (low, high)
    Conv2D: (
        LayerCase("Conv2D-int-padding", Conv2D(2, kernel_size=3, padding=1), (4, 5, 2)),
        LayerCase("Conv2D-pairs-stride2", Conv2D(2, kernel_size=(2, 3), stride=2, padding=((1, 0), 2)), (5, 4, 1)),
    ),
    SimpleRNN: (
        LayerCase("SimpleRNN", SimpleRNN(3), (4, 2)),
        LayerCase("SimpleRNN-relu-last", SimpleRNN(3, activation="relu", return_sequences=False), (5, 2)),
        LayerCase("SimpleRNN-bidirectional-length1", SimpleRNN(2, bidirectional=True), (1, 3)),
    ),
    GRU: (
        LayerCase("GRU", GRU(3), (5, 2)),
        LayerCase("GRU-bidirectional-last", GRU(2, bidirectional=True, return_sequences=False), (4, 3)),
        LayerCase("GRU-length1-last", GRU(3, return_sequences=False), (1, 2)),
    ),
    LSTM: (
        LayerCase("LSTM-bidirectional", LSTM(3, bidirectional=True), (4, 2)),
        LayerCase("LSTM-last", LSTM(2, return_sequences=False), (5, 3)),
        LayerCase("LSTM-length1", LSTM(2), (1, 2)),
    ),
}

ALL_CASES: list[LayerCase] = [case for cases in CASES.values() for case in cases]
RECURRENT = (SimpleRNN, GRU, LSTM)


# --- numpy references ----------------------------------------------------------


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _conv_pads(layer, spatial, kernel, stride):
    """(low, high) per spatial axis, from the layer's padding field as its docstring defines it."""
    n = len(spatial)
    padding = layer.padding
    if padding == "VALID":
        return [(0, 0)] * n
    if padding == "SAME":  # output ceil(size / stride); the odd pad goes after (TensorFlow's rule)
        pads = []
        for size, k, s in zip(spatial, kernel, stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * n
    if n == 1 and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return [tuple(padding)]
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def conv_reference(layer, params, x: np.ndarray) -> np.ndarray:
    """y[..., o, :] = sum_k x_pad[..., s o + k, :] @ W[k] + b, one output position at a time (1-D or 2-D)."""
    W = _np(params["W"])
    n = W.ndim - 2
    kernel = W.shape[:n]
    stride = (layer.stride,) * n if isinstance(layer.stride, int) else tuple(layer.stride)
    spatial = x.shape[x.ndim - n - 1 : -1]
    pads = _conv_pads(layer, spatial, kernel, stride)
    x = np.pad(x, [(0, 0)] * (x.ndim - n - 1) + pads + [(0, 0)])
    out = [(x.shape[x.ndim - n - 1 + a] - kernel[a]) // stride[a] + 1 for a in range(n)]
    y = np.zeros((*x.shape[: x.ndim - n - 1], *out, W.shape[-1]))
    for o in itertools.product(*(range(m) for m in out)):
        for k in itertools.product(*(range(m) for m in kernel)):
            at = tuple(s * oi + ki for s, oi, ki in zip(stride, o, k))
            y[(Ellipsis, *o, slice(None))] += x[(Ellipsis, *at, slice(None))] @ W[k]
    return y + _np(params["b"]) if layer.use_bias else y


def _simple_rnn_run(layer, p, x):
    """x: (N, T, F) -> every h_t, (N, T, H)."""
    h = np.zeros((x.shape[0], layer.hidden_size))
    hs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ p["W"] + h @ p["U"] + p["b"]
        h = np.tanh(a) if layer.activation == "tanh" else np.maximum(a, 0.0)
        hs.append(h)
    return np.stack(hs, axis=1)


def _gru_run(layer, p, x):
    """PyTorch's GRU: the reset gate multiplies (h U_n + b_hn), after the recurrent matmul."""
    H = layer.hidden_size
    W_r, W_z, W_n = (p["W"][:, k * H : (k + 1) * H] for k in range(3))
    U_r, U_z, U_n = (p["U"][:, k * H : (k + 1) * H] for k in range(3))
    b_r, b_z, b_n = (p["b"][k * H : (k + 1) * H] for k in range(3))
    h = np.zeros((x.shape[0], H))
    hs = []
    for t in range(x.shape[1]):
        r = _sigmoid(x[:, t] @ W_r + h @ U_r + b_r)
        z = _sigmoid(x[:, t] @ W_z + h @ U_z + b_z)
        n = np.tanh(x[:, t] @ W_n + b_n + r * (h @ U_n + p["b_hn"]))
        h = (1 - z) * n + z * h
        hs.append(h)
    return np.stack(hs, axis=1)


def _lstm_run(layer, p, x):
    H = layer.hidden_size
    h = c = np.zeros((x.shape[0], H))
    hs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ p["W"] + h @ p["U"] + p["b"]
        i, f, g, o = (
            _sigmoid(a[:, :H]),
            _sigmoid(a[:, H : 2 * H]),
            np.tanh(a[:, 2 * H : 3 * H]),
            _sigmoid(a[:, 3 * H :]),
        )
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs, axis=1)


_RUNS = {SimpleRNN: _simple_rnn_run, GRU: _gru_run, LSTM: _lstm_run}


def recurrent_reference(layer, params, x: np.ndarray) -> np.ndarray:
    """Every h_t (or the last), each direction run by a plain loop over time in float64."""
    run = _RUNS[type(layer)]
    lead, (T, F) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, T, F)
    as_np = lambda p: {name: _np(value) for name, value in p.items()}
    if layer.bidirectional:
        forward = run(layer, as_np(params["forward"]), x3)
        backward = run(layer, as_np(params["backward"]), x3[:, ::-1])[:, ::-1]  # back in time order
        seq = np.concatenate([forward, backward], axis=-1)
        # the backward direction's last state is the one it ends on: at time 0
        last = np.concatenate([forward[:, -1], backward[:, 0]], axis=-1)
    else:
        seq = run(layer, as_np(params), x3)
        last = seq[:, -1]
    return seq.reshape(*lead, T, -1) if layer.return_sequences else last.reshape(*lead, -1)


def reference_forward(layer, params, x, key=None) -> np.ndarray:
    """The layer's output in float64 numpy from its formula (``key`` is unused: no layer here is random)."""
    del key
    x = np.asarray(x, np.float64)
    if isinstance(layer, RECURRENT):
        return recurrent_reference(layer, params, x)
    return conv_reference(layer, params, x)


# --- planted bugs ----------------------------------------------------------------
# Each is the layer's own BPTT with one step or one sum replaced (``_backward``'s step_back /
# param_grads), so the rest of the pass is the real one.


def rnn_no_carry_step(self, p, dstate, inputs):
    (h,), _, _, dy_t = inputs
    da = dy_t * (1 - h * h)  # dh_t = dy_t: the gradient from step t + 1 is dropped
    return (da @ p["U"].T,), (da, None)


def rnn_derivative_previous_step(self, p, dstate, inputs):
    _, (h_prev,), _, dy_t = inputs
    da = (dy_t + dstate[0]) * (1 - h_prev * h_prev)  # tanh' read off h_{t-1} instead of h_t
    return (da @ p["U"].T,), (da, None)


def lstm_forget_wrong_step(self, p, dstate, inputs):
    (h, c), (h_prev, _), gates, dy_t = inputs
    # df = dc * c_t instead of dc * c_{t-1}: the forget gate's derivative at the wrong time step
    return LSTM._step_back(self, p, dstate, ((h, c), (h_prev, c), gates, dy_t))


def lstm_no_cell_carry_step(self, p, dstate, inputs):
    dh_next, _ = dstate
    return LSTM._step_back(self, p, (dh_next, jnp.zeros_like(dh_next)), inputs)  # dc from t + 1 dropped


def _with_step(step_back):
    def backward(self, params, cache, dy):
        return self._backward(params, cache, dy, step_back=step_back)

    return backward


def gru_db_over_time_only(self, params, cache, dy):
    def grads(x3, h_prev, da, dah):  # da: (T, N, 3H)
        return {**GRU._param_grads(self, x3, h_prev, da, dah), "b": da.sum(axis=0)[0]}  # the first sequence's only

    return self._backward(params, cache, dy, param_grads=grads)


def birnn_dx_not_flipped(self, params, cache, dy):
    dparams, dx = self._backward(params, cache, dy)
    p, _, _, da, _ = self._deltas(params, cache, dy)
    dx_dirs = jax.vmap(lambda p, da: jnp.einsum("tng,fg->ntf", da, p["W"]))(p, da)
    return dparams, (dx_dirs[0] + dx_dirs[1]).reshape(dx.shape)  # the backward direction's dx left in reverse time


_SEQUENCE_FIRST = SequenceStack(("*", fbp.Dense(3)))
_LAST_FIRST = SequenceStack(("*", fbp.Dense(3)), per_step=False)
_SEQUENCE_SECOND = SequenceStack((fbp.Dense(3), "*", fbp.Dense(3)))

# fmt: off
# one line each: name, correct layer, buggy backward, model, first wrong layer, a wrong leaf[, extras]
MUTANTS = [
    Mutant("simple_rnn: dh from t+1 not carried (BPTT cut to one step)", SimpleRNN(4),
           _with_step(rnn_no_carry_step), _SEQUENCE_FIRST, "[0]", "[0]['U']"),
    Mutant("simple_rnn: tanh derivative at the wrong time step (h_{t-1})", SimpleRNN(4, return_sequences=False),
           _with_step(rnn_derivative_previous_step), _LAST_FIRST, "[0]", "[0]['W']"),
    Mutant("lstm: forget-gate derivative at the wrong time step (c_t for c_{t-1})", LSTM(3, return_sequences=False),
           _with_step(lstm_forget_wrong_step), _LAST_FIRST, "[0]", "[0]['W']"),
    Mutant("lstm: dc from t+1 not carried", LSTM(3), _with_step(lstm_no_cell_carry_step), _SEQUENCE_FIRST, "[0]",
           "[0]['U']"),
    Mutant("gru: bias gradient summed over the wrong axis (time only, batch > 1 only)", GRU(3),
           gru_db_over_time_only, _SEQUENCE_FIRST, "[0]", "[0]['b']", hidden={"batch": 1}),
    Mutant("bidirectional gru: backward direction's dx left in reverse time", GRU(2, bidirectional=True),
           birnn_dx_not_flipped, _SEQUENCE_SECOND, "[1]", "[0]['W']"),
]
# fmt: on
