"""Recurrent layers with backpropagation through time written by hand: SimpleRNN, GRU, LSTM.

Every layer maps ``x: (..., time, features)`` to ``(..., time, hidden_size * directions)``
(``return_sequences=True``) or to the last state ``(..., hidden_size * directions)``.
All leading axes are independent sequences; inside they are flattened into one
batch axis of size N and the arrays run time-major, ``(T, N, .)``, as
``lax.scan`` wants.

(One file of about 490 lines, on purpose: each cell's ``_step`` and ``_step_back`` sit beside
the one forward scan and the one reverse scan that run all three cells, so a reader checks a
cell's chain rule against the contract it implements without opening another file.)

The forward pass is one ``lax.scan`` over time; the input's share of every gate,
``x_t W + b``, is one matmul over all steps before it. The backward pass is one
reverse ``lax.scan`` from the chain rule: at step t,
``dh_t = dy_t + dh_next`` gathers the output's gradient and the gradient that
flowed back from step t + 1; the cell turns it into the deltas of its gate
pre-activations ``da_t`` and passes ``dh_next = da_t U^T`` (plus the cell's own
direct paths) to step t - 1. The parameter gradients sum over time and are
matmuls after the scan: ``dW = sum_t x_t^T da_t``, ``dU = sum_t h_{t-1}^T da_t``,
``db = sum_t da_t``, and ``dx_t = da_t W^T``.

Parameters, with G gates (SimpleRNN 1, GRU 3, LSTM 4) side by side in PyTorch's
order: ``W: (features, G H)``, ``U: (H, G H)``, ``b: (G H,)``; GRU adds
``b_hn: (H,)``. PyTorch's ``weight_ih_l0`` is ``W.T`` and ``weight_hh_l0`` is
``U.T``; ``b`` is ``bias_ih + bias_hh`` (GRU: except the n gate's ``bias_hh``,
which is ``b_hn``, inside the reset gate). Bidirectional layers hold
``{"forward": ..., "backward": ...}``, one such dict per direction; both
directions run in one scan (jax.vmap over the direction axis).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from fbp.layers.base import (
    Layer,
    check_array,
    check_float,
    describe,
    param_dtype,
    per_example_bias_sq_norms,
    per_example_outer_sq_norms,
)

_DIRECTIONS = ("forward", "backward")


def _sigmoid_grad(s):
    return s * (1 - s)  # d sigma(a) / da in terms of s = sigma(a)


def _tanh_grad(t):
    return 1 - t * t  # d tanh(a) / da in terms of t = tanh(a)


def _shift(states, initial):
    """``[initial, s_0, ..., s_{T-2}]``: the state each step started from, ``(T, N, H)``."""
    return jnp.concatenate([initial[None], states[:-1]], axis=0)


def _per_example(a, batch: int):
    """``(T, N, k)`` time-major -> ``(batch, N / batch * T, k)``: every row of example i together."""
    return jnp.swapaxes(a, 0, 1).reshape(batch, -1, a.shape[-1])


@dataclass(frozen=True)
class _Recurrent(Layer):
    """The shared scan, BPTT scan, directions and per-example hooks. Cells implement:

    - ``_initial(n, dtype)``: the zero state, a tuple whose first entry is h.
    - ``_step(p, state, ax_t) -> (state, (state, saved_t))``: one step, given
      ``ax_t = x_t W + b`` (N, G H); ``saved_t``: what backward needs besides the states.
    - ``_step_back(p, dstate, (state_t, state_{t-1}, saved_t, dy_t)) -> (dstate_{t-1}, (da_t, dah_t))``:
      ``da_t`` the deltas of the gates' input pre-activations (for W, b, dx);
      ``dah_t`` those of the recurrent pre-activations (for U), or None when equal.
    """

    hidden_size: int
    _: KW_ONLY
    bidirectional: bool = False
    return_sequences: bool = True

    _gates: ClassVar[int]

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size < 1:
            raise ValueError(f"{name}: hidden_size must be a positive int, got {self.hidden_size!r}")
        for flag in ("bidirectional", "return_sequences"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"{name}({self.hidden_size}): {flag} must be True or False, got {getattr(self, flag)!r}"
                )

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    # --- parameters ---------------------------------------------------------

    def _init_direction(self, key, features: int, dtype) -> dict:
        """PyTorch's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)); b = bias_ih + bias_hh."""
        H, G = self.hidden_size, self._gates
        bound = 1.0 / math.sqrt(H)
        k_w, k_u, k_bi, k_bh = jax.random.split(key, 4)
        uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)
        return {
            "W": uniform(k_w, (features, G * H)),
            "U": uniform(k_u, (H, G * H)),
            "b": uniform(k_bi, (G * H,)) + uniform(k_bh, (G * H,)),
        }

    def init(self, key, x):
        check_array(self, x, min_ndim=2)
        dtype, features = param_dtype(x), x.shape[-1]
        if not self.bidirectional:
            return self._init_direction(key, features, dtype)
        keys = jax.random.split(key, 2)
        return {d: self._init_direction(k, features, dtype) for d, k in zip(_DIRECTIONS, keys)}

    def _stacked(self, params):
        """One direction's params, or both stacked on a leading axis of 2 (for jax.vmap)."""
        if not self.bidirectional:
            if not isinstance(params, dict) or "W" not in params:
                got = sorted(params) if isinstance(params, dict) else type(params).__name__
                raise ValueError(
                    f"{describe(self)}: expected params {{'W', 'U', 'b', ...}} as init makes them, got {got}"
                )
            return params
        if not isinstance(params, dict) or set(params) != set(_DIRECTIONS):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(
                f"{describe(self)}: expected params {{'forward': ..., 'backward': ...}} as init makes them, got {got}"
            )
        return jax.tree_util.tree_map(lambda f, b: jnp.stack([f, b]), params["forward"], params["backward"])

    def _unstacked(self, grads):
        if not self.bidirectional:
            return grads
        return {d: jax.tree_util.tree_map(lambda g, i=i: g[i], grads) for i, d in enumerate(_DIRECTIONS)}

    def _map(self, fn, *args):
        """``fn`` on each direction: args hold one direction, or both stacked on axis 0 (bidirectional)."""
        return jax.vmap(fn)(*args) if self.bidirectional else fn(*args)

    # --- forward ------------------------------------------------------------

    def _sequences(self, p, x):
        """Check x against ``p`` (from ``_stacked``); ``(N, T, F)``, and per direction in its own time order."""
        check_array(self, x, min_ndim=2)
        check_float(self, x)
        features = p["W"].shape[-2]
        if x.shape[-1] != features:
            raise ValueError(f"{describe(self)}: expected x[..., time, {features}], got shape {tuple(x.shape)}")
        if x.shape[-2] < 1:
            raise ValueError(f"{describe(self)}: expected at least one time step, got shape {tuple(x.shape)}")
        x3 = x.reshape(-1, *x.shape[-2:])
        return x3, (jnp.stack([x3, x3[:, ::-1]]) if self.bidirectional else x3)

    def _scan(self, p, x3):
        """One direction over ``x3: (N, T, F)``: states and saved values, time-major ``(T, N, .)``."""
        # the input's share of every gate for all steps at once: one matmul, outside the loop
        ax = jnp.einsum("ntf,fg->tng", x3, p["W"]) + p["b"][None, None]
        step = lambda state, ax_t: self._step(p, state, ax_t)
        _, (states, saved) = lax.scan(step, self._initial(x3.shape[0], ax.dtype), ax)
        return states, saved

    def forward(self, params, x, *, key=None):
        """``x: (..., T, F)`` -> ``y: (..., T, D H)`` or ``(..., D H)``; ``key`` is ignored.

        Cache: ``(x3, states, saved)``: the input ``(N, T, F)`` (for dW), every
        state ``(T, N, H)`` (h_{t-1} for dU, and what the cell's derivatives
        read) and the cell's activated gates. Each step's local derivatives are
        functions of these alone, so backward never reruns the forward.
        """
        del key
        p = self._stacked(params)
        x3, x_dirs = self._sequences(p, x)
        states, saved = self._map(self._scan, p, x_dirs)
        h = states[0]  # (T, N, H), or (2, T, N, H) in each direction's own time order
        lead = x.shape[:-2]
        if self.return_sequences:
            if self.bidirectional:
                h = jnp.concatenate([h[0], h[1][::-1]], axis=-1)
            y = jnp.swapaxes(h, 0, 1)
            return y.reshape(*lead, *y.shape[1:]), (x3, states, saved)
        # last state: the forward direction's at time T-1; the backward direction's at time 0 (its final step)
        last = jnp.concatenate([h[0][-1], h[1][-1]], axis=-1) if self.bidirectional else h[-1]
        return last.reshape(*lead, last.shape[-1]), (x3, states, saved)

    # --- backward -------------------------------------------------------------

    def _dh_out(self, dy, steps: int):
        """dL/dh_t from the output, per direction in its own time order: ``(T, N, H)`` (stacked if bidirectional)."""
        H, D = self.hidden_size, self._directions
        if self.return_sequences:
            dh = jnp.swapaxes(dy.reshape(-1, steps, D * H), 0, 1)
            return jnp.stack([dh[..., :H], dh[..., H:][::-1]]) if self.bidirectional else dh
        last = dy.reshape(-1, D * H)
        dh = jnp.zeros((steps, last.shape[0], D * H), dy.dtype).at[-1].set(last)
        return jnp.stack([dh[..., :H], dh[..., H:]]) if self.bidirectional else dh

    def _bptt(self, p, states, saved, dh_out, step_back):
        """One direction's reverse scan: ``(da, dah, h_prev)``, each ``(T, N, .)``."""
        n, dtype = dh_out.shape[1], dh_out.dtype
        initial = self._initial(n, dtype)
        previous = tuple(_shift(s, s0) for s, s0 in zip(states, initial))
        back = lambda dstate, inputs: step_back(self, p, dstate, inputs)
        _, (da, dah) = lax.scan(back, initial, (states, previous, saved, dh_out), reverse=True)
        return da, (da if dah is None else dah), previous[0]

    def _deltas(self, params, cache, dy, step_back=None):
        """Per direction (stacked if bidirectional): params, inputs ``(N, T, F)``, h_{t-1}, da, dah."""
        x3, states, saved = cache
        p = self._stacked(params)
        x_dirs = jnp.stack([x3, x3[:, ::-1]]) if self.bidirectional else x3
        step_back = step_back or type(self)._step_back
        dh_out = self._dh_out(dy, x3.shape[1])
        da, dah, h_prev = self._map(lambda p, s, sv, d: self._bptt(p, s, sv, d, step_back), p, states, saved, dh_out)
        return p, x_dirs, h_prev, da, dah

    def _param_grads(self, x3, h_prev, da, dah) -> dict:
        """One direction: dW = sum x_t^T da_t, dU = sum h_{t-1}^T dah_t, db = sum da_t (over time and sequences)."""
        return {
            "W": jnp.einsum("ntf,tng->fg", x3, da),
            "U": jnp.einsum("tnh,tng->hg", h_prev, dah),
            "b": da.sum(axis=(0, 1)),
        }

    def _dx(self, p, da, dy, x3):
        """dx_t = da_t W^T, each direction's put back in time order and added: shaped like x."""
        dx = self._map(lambda p, da: jnp.einsum("tng,fg->ntf", da, p["W"]), p, da)
        if self.bidirectional:
            dx = dx[0] + dx[1][:, ::-1]
        lead = dy.shape[:-2] if self.return_sequences else dy.shape[:-1]
        return dx.reshape(*lead, *x3.shape[1:])

    def _backward(self, params, cache, dy, *, step_back=None, param_grads=None):
        """``backward`` with a cell step or the gradient sums swapped (planted bugs in the tests use this)."""
        p, x_dirs, h_prev, da, dah = self._deltas(params, cache, dy, step_back)
        dparams = self._unstacked(self._map(param_grads or self._param_grads, x_dirs, h_prev, da, dah))
        return dparams, self._dx(p, da, dy, cache[0])

    def backward(self, params, cache, dy):
        """Backpropagation through time: one reverse scan for the deltas, then dW, dU, db and dx as matmuls.

        ``dy: (..., T, D H)`` or ``(..., D H)`` (only the last step's h gets it);
        returns ``dparams`` shaped like params and ``dx: (..., T, F)``.
        """
        return self._backward(params, cache, dy)

    def hidden_grads(self, params, cache, dy):
        """dL/dh_t at every step, as backpropagation through time computes it (what ``backward`` runs on).

        dh_t = dy_t + the gradient step t+1 sends back through h_t; its norm against t shows a gradient
        vanish or survive (scripts/bptt_grad_norms.py). ``cache`` from ``forward``, ``dy`` as ``backward``
        takes it. Returns ``(T, N, H)``, time-major, N the sequences (``(2, T, N, H)`` if bidirectional,
        the backward direction in its own, reversed, time).
        """

        def recording(layer, p, dstate, inputs):
            # the cell's own step, unchanged; its second output now carries dh_t = dy_t + dh_next instead of dah_t
            dstate_prev, (da, _) = type(layer)._step_back(layer, p, dstate, inputs)
            return dstate_prev, (da, inputs[3] + dstate[0])

        return self._deltas(params, cache, dy, step_back=recording)[-1]

    # --- per-example hooks ------------------------------------------------------

    def _sq_norms(self, batch, x3, h_prev, da, dah):
        """One direction: ||dW_i||^2 + ||dU_i||^2 + ||db_i||^2, each a sum over time of outer products."""
        x_i = x3.reshape(batch, -1, x3.shape[-1])
        da_i = _per_example(da, batch)
        return (
            per_example_outer_sq_norms(x_i, da_i)
            + per_example_outer_sq_norms(_per_example(h_prev, batch), _per_example(dah, batch))
            + per_example_bias_sq_norms(da_i)
        )

    def _weighted(self, x_dirs, h_prev, da, dah, weights):
        """sum_i weights[i] g_i: each example's gate deltas scaled by its weight (examples do not mix)."""
        n = h_prev.shape[-2]
        w = jnp.repeat(weights.astype(da.dtype), n // weights.shape[0])[None, :, None]  # (1, N, 1): one per sequence
        return self._unstacked(
            self._map(lambda x, h, a, ah: self._param_grads(x, h, a * w, ah * w), x_dirs, h_prev, da, dah)
        )

    def per_example_backward(self, params, cache, dy):
        """``(sq_norms, dx, weighted_grads)`` from one reverse scan (see ``call_per_example_backward``).

        ``dy: (batch, ..., T, D H)``; the deltas of every step are per example
        (a step mixes time, never examples), so the norms and the weighted sums
        both come from them.
        """
        batch = dy.shape[0]
        p, x_dirs, h_prev, da, dah = self._deltas(params, cache, dy)
        sq = self._map(lambda x, h, a, ah: self._sq_norms(batch, x, h, a, ah), x_dirs, h_prev, da, dah)
        sq = sq.sum(axis=0) if self.bidirectional else sq
        return sq, self._dx(p, da, dy, cache[0]), lambda weights: self._weighted(x_dirs, h_prev, da, dah, weights)

    def per_example_sq_norms(self, params, cache, dy):
        """``(batch,)``: the squared norm of each example's gradient, from the per-step deltas (no per-example dW)."""
        return self.per_example_backward(params, cache, dy)[0]

    def per_example_weighted_grads(self, params, cache, dy, weights):
        """sum_i weights[i] g_i, shaped like params."""
        return self.per_example_backward(params, cache, dy)[2](weights)


@dataclass(frozen=True)
class SimpleRNN(_Recurrent):
    """Elman recurrent layer: h_t = act(x_t W + h_{t-1} U + b), h_{-1} = 0.

    Args:
      hidden_size: H, the width of h.
      activation: "tanh" (default) or "relu".
      bidirectional: also run a second layer from the last step to the first
        and concatenate its h_t after the forward one's.
      return_sequences: output every h_t (default), else the last state only
        (the backward direction's last state is its final step, at time 0, as
        PyTorch's h_n).

    Shapes: ``x: (..., T, F)``, ``W: (F, H)``, ``U: (H, H)``, ``b: (H,)``,
    ``y: (..., T, D H)`` or ``(..., D H)`` with D = 2 if bidirectional else 1.
    Cache: x, every h_t.

    Backward, from the last step to the first: dh_t = dy_t + dh_next;
    da_t = dh_t act'(a_t), read off h_t (tanh: 1 - h_t^2; relu: h_t > 0);
    dh_next = da_t U^T for step t - 1.
    """

    _: KW_ONLY
    activation: str = "tanh"

    _gates: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ("tanh", "relu"):
            raise ValueError(
                f"SimpleRNN({self.hidden_size}): activation must be 'tanh' or 'relu', got {self.activation!r}"
            )

    def _initial(self, n, dtype):
        return (jnp.zeros((n, self.hidden_size), dtype),)

    def _step(self, p, state, ax_t):
        a = ax_t + state[0] @ p["U"]
        h = jnp.tanh(a) if self.activation == "tanh" else jnp.maximum(a, 0)
        return (h,), ((h,), ())

    def _step_back(self, p, dstate, inputs):
        (h,), _, _, dy_t = inputs
        dh = dy_t + dstate[0]  # the output's gradient and the one from step t + 1
        # relu: the subgradient 0 at a = 0, read off h = 0
        da = dh * (_tanh_grad(h) if self.activation == "tanh" else (h > 0).astype(h.dtype))
        return (da @ p["U"].T,), (da, None)


@dataclass(frozen=True)
class GRU(_Recurrent):
    """Gated recurrent unit (Cho et al. 2014), PyTorch's variant: the reset gate acts after the recurrent matmul.

    With gates side by side in the order (r, z, n) in W, U and b, and h_{-1} = 0::

        r_t = sigmoid(x_t W_r + h_{t-1} U_r + b_r)
        z_t = sigmoid(x_t W_z + h_{t-1} U_z + b_z)
        n_t = tanh(x_t W_n + b_n + r_t * (h_{t-1} U_n + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    (Keras' default, ``reset_after=False``, uses (r_t * h_{t-1}) U_n instead.)

    Args:
      hidden_size: H. bidirectional, return_sequences: as SimpleRNN.

    Shapes: ``x: (..., T, F)``, ``W: (F, 3H)``, ``U: (H, 3H)``, ``b: (3H,)``,
    ``b_hn: (H,)``, ``y: (..., T, D H)`` or ``(..., D H)``.
    Cache: x, every h_t and (r_t, z_t, n_t, h_{t-1} U_n + b_hn).

    Backward at step t, with dh_t = dy_t + dh_next: dn = dh_t (1 - z),
    dz = dh_t (h_{t-1} - n), da_n = dn (1 - n^2), da_r = da_n (h_{t-1} U_n + b_hn) r (1 - r),
    da_z = dz z (1 - z); the recurrent matmul sees (da_r, da_z, r da_n) (so do
    dU and db_hn), and dh_next = dh_t z + (da_r, da_z, r da_n) U^T.
    """

    _gates: ClassVar[int] = 3

    def _init_direction(self, key, features, dtype):
        params = super()._init_direction(key, features, dtype)
        H, bound = self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        k_n, k_hn = jax.random.split(jax.random.fold_in(key, 1))
        uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)
        # b_n is bias_ih's alone (bias_hh's n part is b_hn, inside the reset gate): one draw
        params["b"] = params["b"].at[2 * H :].set(uniform(k_n, (H,)))
        params["b_hn"] = uniform(k_hn, (H,))
        return params

    def _initial(self, n, dtype):
        return (jnp.zeros((n, self.hidden_size), dtype),)

    def _step(self, p, state, ax_t):
        H, (h_prev,) = self.hidden_size, state
        ah = h_prev @ p["U"]
        r = jax.nn.sigmoid(ax_t[:, :H] + ah[:, :H])
        z = jax.nn.sigmoid(ax_t[:, H : 2 * H] + ah[:, H : 2 * H])
        hn = ah[:, 2 * H :] + p["b_hn"][None]
        n = jnp.tanh(ax_t[:, 2 * H :] + r * hn)
        h = (1 - z) * n + z * h_prev
        return (h,), ((h,), (r, z, n, hn))

    def _step_back(self, p, dstate, inputs):
        _, (h_prev,), (r, z, n, hn), dy_t = inputs
        dh = dy_t + dstate[0]
        da_n = dh * (1 - z) * _tanh_grad(n)
        da_r = da_n * hn * _sigmoid_grad(r)
        da_z = dh * (h_prev - n) * _sigmoid_grad(z)
        dah = jnp.concatenate([da_r, da_z, da_n * r], axis=-1)  # deltas of h_{t-1} U (+ b_hn)
        return (dh * z + dah @ p["U"].T,), (jnp.concatenate([da_r, da_z, da_n], axis=-1), dah)

    def _param_grads(self, x3, h_prev, da, dah):
        return {**super()._param_grads(x3, h_prev, da, dah), "b_hn": dah[..., 2 * self.hidden_size :].sum(axis=(0, 1))}

    def _sq_norms(self, batch, x3, h_prev, da, dah):
        return super()._sq_norms(batch, x3, h_prev, da, dah) + per_example_bias_sq_norms(
            _per_example(dah[..., 2 * self.hidden_size :], batch)
        )


@dataclass(frozen=True)
class LSTM(_Recurrent):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).

    With gates side by side in the order (i, f, g, o) in W, U and b, a_t = x_t W
    + h_{t-1} U + b, and h_{-1} = c_{-1} = 0::

        i_t, f_t, g_t, o_t = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
        c_t = f_t * c_{t-1} + i_t * g_t
        h_t = o_t * tanh(c_t)

    Args:
      hidden_size: H. bidirectional, return_sequences: as SimpleRNN (the output is h).

    Shapes: ``x: (..., T, F)``, ``W: (F, 4H)``, ``U: (H, 4H)``, ``b: (4H,)``,
    ``y: (..., T, D H)`` or ``(..., D H)``. Cache: x, every (h_t, c_t), the gates.

    Backward at step t, carrying (dh_next, dc_next): dh = dy_t + dh_next;
    do = dh tanh(c_t); dc = dc_next + dh o (1 - tanh^2 c_t); di = dc g;
    df = dc c_{t-1}; dg = dc i; each times its activation's derivative gives
    da_t; dh_next = da_t U^T and dc_next = dc f for step t - 1.
    """

    _gates: ClassVar[int] = 4

    def _initial(self, n, dtype):
        zeros = jnp.zeros((n, self.hidden_size), dtype)
        return (zeros, zeros)

    def _step(self, p, state, ax_t):
        H, (h_prev, c_prev) = self.hidden_size, state
        a = ax_t + h_prev @ p["U"]
        i, f, o = (jax.nn.sigmoid(a[:, k * H : (k + 1) * H]) for k in (0, 1, 3))
        g = jnp.tanh(a[:, 2 * H : 3 * H])
        c = f * c_prev + i * g
        h = o * jnp.tanh(c)
        return (h, c), ((h, c), jnp.concatenate([i, f, g, o], axis=-1))

    def _step_back(self, p, dstate, inputs):
        H = self.hidden_size
        (_, c), (_, c_prev), gates, dy_t = inputs
        i, f, g, o = (gates[:, k * H : (k + 1) * H] for k in range(4))
        dh_next, dc_next = dstate
        dh = dy_t + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * _tanh_grad(tanh_c)
        da = jnp.concatenate(
            [
                dc * g * _sigmoid_grad(i),
                dc * c_prev * _sigmoid_grad(f),
                dc * i * _tanh_grad(g),
                dh * tanh_c * _sigmoid_grad(o),
            ],
            axis=-1,
        )
        return (da @ p["U"].T, dc * f), (da, None)
