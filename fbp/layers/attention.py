"""Multi-head self-attention with a hand-written, FlashAttention-style backward.

The cache keeps Q, K, V, the attention output O and the row log-sum-exp of the
scores, never the ``(time, time)`` probabilities: backward recomputes them from
Q, K and the log-sum-exp (Dao et al. 2022, FlashAttention, Algorithm 4), so the
cache costs O(batch * heads * time * head_dim) memory, not O(batch * heads * time^2).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

import jax
import jax.numpy as jnp

from fbp.layers.base import (
    Layer,
    check_array,
    check_float,
    describe,
    param_dtype,
    per_example_bias_grads,
    per_example_bias_sq_norms,
    per_example_outer,
)

_PROJECTIONS = ("q", "k", "v", "o")


def _flat(a: jax.Array, keep: int = 1) -> jax.Array:
    """Merge every axis but the last ``keep`` into one: ``(..., n) -> (rows, n)``."""
    return a.reshape(-1, *a.shape[a.ndim - keep :])


def _softmax_dtype(a: jax.Array):
    """Scores, their log-sum-exp and the softmax backward run in at least float32 (bfloat16 inputs too)."""
    return jnp.promote_types(a.dtype, jnp.float32)


def _add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    # broadcast_to_rank: b (features,) -> (1, ..., features), explicit under rank_promotion="raise"
    return y + jax.lax.broadcast_to_rank(b, y.ndim)


@dataclass(frozen=True)
class MultiHeadAttention(Layer):
    """Self-attention: y = concat_h(softmax(Q_h K_h^T / sqrt(d)) V_h) Wo + bo, Q = x Wq + bq, etc.

    Args:
      num_heads: the number of heads h.
      head_dim: d, the width of each head; default ``d_model // num_heads``
        (then d_model must divide by num_heads).
      causal: position t attends only to positions s <= t (a language model).

    Shapes: ``x: (..., time, d_model)`` with any leading axes, ``y`` the same.
    ``Wq, Wk, Wv: (d_model, heads * head_dim)``, ``bq, bk, bv: (heads * head_dim,)``,
    ``Wo: (heads * head_dim, d_model)``, ``bo: (d_model,)``.

    Cache: ``x``, ``q, k, v, o: (..., time, heads, head_dim)`` and the row
    log-sum-exp ``lse: (..., heads, time)`` of the scaled scores. P = exp(S - lse)
    is recomputed in backward, so no ``(time, time)`` array outlives the call.
    Scores, softmax and its backward run in at least float32, as
    jax.nn.dot_product_attention does for bfloat16 inputs.
    """

    num_heads: int
    _: KW_ONLY
    head_dim: int | None = None
    causal: bool = False

    def __post_init__(self):
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise ValueError(f"MultiHeadAttention: num_heads must be a positive int, got {self.num_heads!r}")
        if self.head_dim is not None and (
            not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 1
        ):
            raise ValueError(f"MultiHeadAttention: head_dim must be None or a positive int, got {self.head_dim!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"MultiHeadAttention: causal must be True or False, got {self.causal!r}")

    # --- shapes and checks ---------------------------------------------------

    def _check_x(self, x) -> None:
        check_array(self, x, min_ndim=2)
        check_float(self, x)

    def _head_dim_for(self, d_model: int) -> int:
        if self.head_dim is not None:
            return self.head_dim
        if d_model % self.num_heads:
            raise ValueError(
                f"{describe(self)}: d_model {d_model} (x[..., {d_model}]) does not divide by num_heads "
                f"{self.num_heads}; pick num_heads dividing {d_model} or pass head_dim="
            )
        return d_model // self.num_heads

    def _check(self, params, x) -> None:
        self._check_x(x)
        d_model, width = params["Wq"].shape
        if x.shape[-1] != d_model:
            raise ValueError(f"{describe(self)}: expected x[..., time, {d_model}], got shape {tuple(x.shape)}")
        if width % self.num_heads:
            raise ValueError(
                f"{describe(self)}: params hold Wq of width {width}, which does not divide by "
                f"num_heads {self.num_heads}; were they made by another layer's init?"
            )

    def _split_heads(self, a: jax.Array) -> jax.Array:
        """``(..., time, heads * head_dim) -> (..., time, heads, head_dim)``."""
        return a.reshape(*a.shape[:-1], self.num_heads, a.shape[-1] // self.num_heads)

    def _mask(self, scores: jax.Array) -> jax.Array:
        """The causal mask, s <= t, broadcast to ``scores: (..., heads, time, time)`` explicitly."""
        time = scores.shape[-1]
        return jnp.broadcast_to(jnp.tril(jnp.ones((time, time), bool)), scores.shape)

    def _scores(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """S = Q K^T / sqrt(d): ``(..., heads, time_q, time_k)``, in at least float32 (``_softmax_dtype``)."""
        return jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=_softmax_dtype(q)) / math.sqrt(
            q.shape[-1]
        )

    # --- the layer -------------------------------------------------------------

    def init(self, key, x):
        self._check_x(x)
        d_model = x.shape[-1]
        width = self.num_heads * self._head_dim_for(d_model)
        dtype = param_dtype(x)
        glorot = jax.nn.initializers.glorot_uniform()
        keys = jax.random.split(key, 4)
        params = {}
        for name, k, shape in zip(_PROJECTIONS, keys, [(d_model, width)] * 3 + [(width, d_model)]):
            params[f"W{name}"] = glorot(k, shape, dtype)
            params[f"b{name}"] = jnp.zeros((shape[1],), dtype)
        return params

    def _attend(self, params, x):
        """(y, cache) of the forward pass."""
        self._check(params, x)
        q, k, v = (self._split_heads(_add_bias(x @ params[f"W{n}"], params[f"b{n}"])) for n in "qkv")
        scores = self._scores(q, k)
        if self.causal:
            scores = jnp.where(self._mask(scores), scores, -jnp.inf)
        # lse = log sum_s exp(S_ts), shifted by the row max (the shift cancels; stop_gradient keeps it out of vjp)
        row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
        lse = row_max[..., 0] + jnp.log(jnp.exp(scores - row_max).sum(axis=-1))
        probs = jnp.exp(scores - lse[..., None])  # masked entries: exp(-inf) = 0
        o = jnp.einsum("...hts,...shd->...thd", probs.astype(v.dtype), v)
        y = _add_bias(o.reshape(*x.shape[:-1], -1) @ params["Wo"], params["bo"])
        return y, {"x": x, "q": q, "k": k, "v": v, "o": o, "lse": lse}

    def apply(self, params, x, *, key=None):
        """``key`` is ignored (no randomness); provided for compatibility."""
        return self._attend(params, x)[0]

    def forward(self, params, x, *, key=None):
        """``key`` is ignored (no randomness); provided for compatibility."""
        return self._attend(params, x)

    def _projection_grads(self, params, cache, dy):
        """Each projection's (input, output gradient) pair, and dx: the attention backward.

        Returns ``({"q": (x, dQ), "k": (x, dK), "v": (x, dV), "o": (O, dy)}, dx)`` with
        dQ, dK, dV, O flattened to ``(..., time, heads * head_dim)``: projection n's
        gradient is dW_n = input^T output-gradient and db_n = sum output-gradient.
        """
        x, q, k, v, o, lse = (cache[n] for n in ("x", "q", "k", "v", "o", "lse"))
        do = self._split_heads(dy @ params["Wo"].T)
        # recompute P = exp(S - lse) instead of caching it (FlashAttention); masked entries are 0
        probs = jnp.exp(self._scores(q, k) - lse[..., None])
        if self.causal:
            probs = jnp.where(self._mask(probs), probs, jnp.zeros_like(probs))
        dv = jnp.einsum("...hts,...thd->...shd", probs.astype(do.dtype), do)  # dV = P^T dO
        dprobs = jnp.einsum("...thd,...shd->...hts", do, v, preferred_element_type=probs.dtype)  # dP = dO V^T
        # softmax backward, dS = P (dP - rowsum(dP P)), with rowsum(dP P)_t = rowsum(dO O)_t (O = P V)
        rowsum = jnp.einsum("...thd,...thd->...ht", do, o, preferred_element_type=probs.dtype)[..., None]
        dscores = (probs * (dprobs - rowsum)).astype(q.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq = jnp.einsum("...hts,...shd->...thd", dscores, k) * scale  # dQ = dS K / sqrt(d)
        dk = jnp.einsum("...hts,...thd->...shd", dscores, q) * scale  # dK = dS^T Q / sqrt(d)
        merge = lambda a: a.reshape(*a.shape[:-2], -1)
        dq, dk, dv = merge(dq), merge(dk), merge(dv)
        dx = dq @ params["Wq"].T + dk @ params["Wk"].T + dv @ params["Wv"].T
        return {"q": (x, dq), "k": (x, dk), "v": (x, dv), "o": (merge(o), dy)}, dx

    def backward(self, params, cache, dy):
        pairs, dx = self._projection_grads(params, cache, dy)
        dparams = {}
        for name, (a, b) in pairs.items():
            b2 = _flat(b)
            dparams[f"W{name}"] = _flat(a).T @ b2  # dW = input^T dy, summed over every leading axis and time
            dparams[f"b{name}"] = b2.sum(axis=0)
        return dparams, dx

    # --- per-example hooks -------------------------------------------------------

    def _check_batched(self, dy) -> None:
        if dy.ndim < 3:
            raise ValueError(
                f"{describe(self)}: per-example gradients need a batch axis, x (batch, ..., time, d_model); "
                f"got dy of shape {tuple(dy.shape)}"
            )

    def per_example_backward(self, params, cache, dy):
        """``(sq_norms, dx, weighted_grads)`` from one attention backward (see ``call_per_example_backward``).

        Each projection's per-example gradient is a sum over the example's
        positions of outer products input_t^T grad_t, so its squared norm comes
        from ``per_example_outer`` (Gram form or the matrix, whichever is
        cheaper: mixed ghost clipping, Bu et al. 2022; the matrices, where
        made, are reused for ``weighted_grads``); the bias's is ||sum_t grad_t||^2.
        """
        self._check_batched(dy)
        batch = dy.shape[0]
        pairs, dx = self._projection_grads(params, cache, dy)
        per_position = {n: tuple(c.reshape(batch, -1, c.shape[-1]) for c in pair) for n, pair in pairs.items()}
        outer = {n: per_example_outer(a, b) for n, (a, b) in per_position.items()}
        sq_norms = sum(outer[n][0] + per_example_bias_sq_norms(b) for n, (_, b) in per_position.items())

        def weighted_grads(weights):
            dparams = {}
            for name, (_, b) in per_position.items():
                dparams[f"W{name}"] = outer[name][1](weights)
                dparams[f"b{name}"] = weights.astype(b.dtype) @ per_example_bias_grads(b)
            return dparams

        return sq_norms, dx, weighted_grads

    def per_example_sq_norms(self, params, cache, dy):
        """``sum_n ||dW_n,i||^2 + ||db_n,i||^2`` over the four projections, for every example i: ``(batch,)``."""
        return self.per_example_backward(params, cache, dy)[0]

    def per_example_weighted_grads(self, params, cache, dy, weights):
        """``sum_i weights[i] g_i``, shaped like params."""
        return self.per_example_backward(params, cache, dy)[2](weights)
