"""Test registry for the attention layers: cases, numpy references and planted bugs.

``CASES`` has the form of ``registry.CASES`` (layer class -> LayerCase tuple);
``reference_forward`` computes each layer in float64 numpy from its formula,
never by calling the layer; ``MUTANTS`` has the form of ``mutants.MUTANTS``
(its models take sequences ``(batch, 5, 4)`` with labels ``(batch, 5)``, built
by ``mutants.SequenceStack``), run by test_mutants with the rest.

Import ``registry`` before this module (``registry`` may merge these cases in
at its end; this module needs ``registry.LayerCase`` when it loads).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import registry
from mutants import Mutant, SequenceStack, Stack
from registry import LayerCase

import fbp
from fbp.layers.attention import MultiHeadAttention
from fbp.layers.transformer import PositionalEmbedding, RMSNorm, TransformerBlock

# --- cases -------------------------------------------------------------------
# feature_shape is (time, d_model); heads, head_dim and time differ, so a (time, time) array is recognisable

CASES: dict[type, tuple[LayerCase, ...]] = {
    MultiHeadAttention: (
        LayerCase("MultiHeadAttention", MultiHeadAttention(2), (5, 8)),
        LayerCase("MultiHeadAttention-causal-head_dim", MultiHeadAttention(3, head_dim=2, causal=True), (4, 5)),
    ),
    RMSNorm: (LayerCase("RMSNorm", RMSNorm(), (5,)),),
    PositionalEmbedding: (LayerCase("PositionalEmbedding", PositionalEmbedding(6), (4, 3)),),
    TransformerBlock: (LayerCase("TransformerBlock", TransformerBlock(2, mlp_ratio=2), (3, 4)),),
}

ALL_CASES: list[LayerCase] = [case for cases in CASES.values() for case in cases]


# --- numpy references ----------------------------------------------------------


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_reference(layer, params, x: np.ndarray) -> np.ndarray:
    """concat_h softmax(Q_h K_h^T / sqrt(d) [+ -inf above the diagonal]) V_h, then Wo, bo; float64 numpy."""
    p = {name: _np(value) for name, value in params.items()}
    heads = layer.num_heads
    head_dim = p["Wq"].shape[1] // heads
    time = x.shape[-2]
    q, k, v = (
        (x @ p[f"W{n}"] + p[f"b{n}"]).reshape(*x.shape[:-1], heads, head_dim).swapaxes(-2, -3) for n in "qkv"
    )  # (..., heads, time, head_dim)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(head_dim)
    if layer.causal:
        scores = np.where(np.tril(np.ones((time, time), bool)), scores, -np.inf)
    out = (_softmax(scores) @ v).swapaxes(-2, -3).reshape(*x.shape[:-1], heads * head_dim)
    return out @ p["Wo"] + p["bo"]


def _rms_norm(layer, params, x):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + layer.epsilon) * _np(params["scale"])


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _transformer_block(layer, params, x):
    (norm1, attention), (norm2, dense1, _, dense2) = params
    attention_layer = MultiHeadAttention(layer.num_heads, causal=layer.causal)
    x = x + attention_reference(attention_layer, attention, _rms_norm(RMSNorm(), norm1, x))
    hidden = _gelu(_rms_norm(RMSNorm(), norm2, x) @ _np(dense1["W"]) + _np(dense1["b"]))
    return x + hidden @ _np(dense2["W"]) + _np(dense2["b"])


REFERENCES = {
    MultiHeadAttention: lambda layer, p, x, key: attention_reference(layer, p, x),
    RMSNorm: lambda layer, p, x, key: _rms_norm(layer, p, x),
    PositionalEmbedding: lambda layer, p, x, key: x + _np(p["W"])[: x.shape[-2]],
    TransformerBlock: lambda layer, p, x, key: _transformer_block(layer, p, x),
}


def reference_forward(layer, params, x, key=None) -> np.ndarray:
    """The layer's output in float64 numpy; Sequential/Residual recurse, other layers use registry's."""
    x = np.asarray(x) if np.issubdtype(np.asarray(x).dtype, np.integer) else _np(x)
    if type(layer) in REFERENCES:
        return REFERENCES[type(layer)](layer, params, x, key)
    if isinstance(layer, fbp.Sequential):
        keys = [None] * len(layer.layers) if key is None else list(jax.random.split(key, len(layer.layers)))
        for child, p, k in zip(layer.layers, params, keys):
            x = reference_forward(child, p, x, k)
        return x
    if isinstance(layer, fbp.Residual):
        return x + reference_forward(layer.block, params, x, key)
    return registry.reference_forward(layer, params, x, key)


def gpt(vocabulary: int, d_model: int, max_length: int, num_heads: int, blocks: int, dtype=jnp.float32):
    """The GPT-style model the issue names: Embedding, PositionalEmbedding, blocks, RMSNorm, a Dense head."""
    return fbp.Sequential(
        [
            fbp.Embedding(vocabulary, d_model, dtype=dtype),
            PositionalEmbedding(max_length),
            *[TransformerBlock(num_heads) for _ in range(blocks)],
            RMSNorm(),
            fbp.Dense(vocabulary),
        ]
    )


# --- planted bugs ---------------------------------------------------------------


def attention_backward(*, rowsum: bool = True, mask: bool = True, scale_power: int = 1):
    """A ``MultiHeadAttention.backward`` written again from the formulas, with switches that plant bugs.

    Args:
      rowsum: keep the rowsum(dO * O) term of dS = P (dP - rowsum(dO * O)).
      mask: apply the causal mask to the recomputed P (forward always applies it).
      scale_power: dQ = dS K / sqrt(d)**scale_power (1 is right), likewise dK.
    """

    def backward(self, params, cache, dy):
        x, q, k, v, o, lse = (cache[n] for n in ("x", "q", "k", "v", "o", "lse"))
        heads, head_dim = q.shape[-2], q.shape[-1]
        do = (dy @ params["Wo"].T).reshape(*dy.shape[:-1], heads, head_dim)
        scores = jnp.einsum("...thd,...shd->...hts", q, k) / math.sqrt(head_dim)
        probs = jnp.exp(scores - lse[..., None])
        if self.causal and mask:
            probs = jnp.where(jnp.broadcast_to(jnp.tril(jnp.ones(probs.shape[-2:], bool)), probs.shape), probs, 0.0)
        dv = jnp.einsum("...hts,...thd->...shd", probs, do)
        dprobs = jnp.einsum("...thd,...shd->...hts", do, v)
        delta = jnp.einsum("...thd,...thd->...ht", do, o)[..., None] if rowsum else jnp.zeros_like(dprobs)
        dscores = probs * (dprobs - delta)
        scale = math.sqrt(head_dim) ** -scale_power
        dq = jnp.einsum("...hts,...shd->...thd", dscores, k) * scale
        dk = jnp.einsum("...hts,...thd->...shd", dscores, q) * scale
        merge = lambda a: a.reshape(*a.shape[:-2], heads * head_dim)
        grads = {"q": merge(dq), "k": merge(dk), "v": merge(dv)}
        flat_x = x.reshape(-1, x.shape[-1])
        dparams = {}
        for name, g in grads.items():
            dparams[f"W{name}"] = flat_x.T @ g.reshape(-1, g.shape[-1])
            dparams[f"b{name}"] = g.reshape(-1, g.shape[-1]).sum(axis=0)
        ctx = merge(o).reshape(-1, heads * head_dim)
        dparams["Wo"] = ctx.T @ dy.reshape(-1, dy.shape[-1])
        dparams["bo"] = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
        dx = sum(grads[n] @ params[f"W{n}"].T for n in "qkv")
        return dparams, dx

    return backward


def rmsnorm_missing_term(self, params, cache, dy):
    xhat, inv_rms = cache
    dx = inv_rms * dy * jax.lax.broadcast_to_rank(params["scale"], dy.ndim)  # the - xhat mean(g xhat) term is gone
    return {"scale": (dy * xhat).reshape(-1, dy.shape[-1]).sum(axis=0)}, dx


def positional_mean_not_sum(self, params, cache, dy):
    rows = dy.reshape(-1, *dy.shape[-2:]).mean(axis=0)  # mean over the batch instead of the sum
    return {"W": jnp.pad(rows, ((0, self.max_length - rows.shape[0]), (0, 0)))}, dy


_CAUSAL = MultiHeadAttention(2, causal=True)
_ATTENTION = SequenceStack((fbp.Dense(6), "*", fbp.Dense(3)), time=5, features=4)

# fmt: off
# one line each: name, correct layer, buggy backward, model, first wrong layer, a wrong leaf[, extras]
MUTANTS = [
    Mutant("attention: rowsum(dO * O) term missing", _CAUSAL, attention_backward(rowsum=False), _ATTENTION,
           "[1]", "[1]['Wq']"),
    Mutant("attention: causal mask in forward but not in backward", _CAUSAL, attention_backward(mask=False),
           _ATTENTION, "[1]", "[1]['Wv']"),
    Mutant("attention: 1/sqrt(d) scale applied twice", _CAUSAL, attention_backward(scale_power=2), _ATTENTION,
           "[1]", "[1]['Wk']"),
    Mutant("rmsnorm: xhat mean(g xhat) term missing", RMSNorm(), rmsnorm_missing_term,
           Stack((fbp.Dense(6), "*", fbp.Dense(3))), "[1]", "[0]['W']"),
    Mutant("positional embedding: dW mean instead of sum over the batch", PositionalEmbedding(5),
           positional_mean_not_sum, SequenceStack(("*", fbp.Dense(3)), time=5, features=4), "[0]", "[0]['W']", hidden={"batch": 1}),
]
# fmt: on

# the same re-written backward with every switch right: must pass, so the catches above are the bugs'
CORRECT_TWIN = Mutant("attention: re-written backward, no bug", _CAUSAL, attention_backward(), _ATTENTION, "", "")


def cache_bytes(layer: Any, x_shape: tuple[int, ...], dtype=jnp.float32) -> int:
    """Bytes of ``layer.forward``'s cache for an input of ``x_shape`` (shapes only, nothing runs)."""
    x = jax.ShapeDtypeStruct(x_shape, dtype)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    _, cache = jax.eval_shape(layer.forward, params, x)
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(cache))
