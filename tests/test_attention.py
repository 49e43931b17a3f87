"""MultiHeadAttention, RMSNorm, PositionalEmbedding and TransformerBlock: forward, backward, cache, hooks.

Forward against jax.nn.dot_product_attention and a numpy formula; backward
against jax.vjp of the layer's own forward and of a dot_product_attention
forward, and float64 finite differences (fbp.check_gradients, on a GPT-style
model with a cross-entropy over every position); the per-example hooks against
jax.vmap of the layer's own backward over single examples. The planted bugs of
registry_attention.MUTANTS run in test_mutants with the rest.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import registry  # noqa: F401 - first: registry_attention needs registry.LayerCase while it loads
from registry import array, make_params
from registry_attention import cache_bytes, gpt, reference_forward

import fbp
from fbp.grads import clipped_value_and_grad
from fbp.layers.attention import MultiHeadAttention
from fbp.layers.base import call_per_example_backward
from fbp.layers.transformer import PositionalEmbedding, RMSNorm, TransformerBlock

# jax.nn.dot_product_attention casts the scores to float32 for the softmax even for float64 inputs
# (jax/_src/nn/functions.py, _dot_product_attention_core), so against it float64 agrees only to
# float32 rounding: eps32 = 1.2e-7 times O(10) terms, with a 10x margin
DPA_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _random(rng, shape, dtype):
    return array(rng.standard_normal(shape), dtype)


def _heads(a, heads):
    return a.reshape(*a.shape[:-1], heads, a.shape[-1] // heads)


def _dpa_forward(layer, params, x):
    """The layer's forward written with jax.nn.dot_product_attention: x (batch, time, d_model)."""
    bias = lambda y, b: y + jax.lax.broadcast_to_rank(b, y.ndim)
    q, k, v = (_heads(bias(x @ params[f"W{n}"], params[f"b{n}"]), layer.num_heads) for n in "qkv")
    out = jax.nn.dot_product_attention(q, k, v, is_causal=layer.causal, implementation="xla")
    return bias(out.reshape(*x.shape[:-1], -1) @ params["Wo"], params["bo"])


# layer by layer, forward against numpy and backward against jax.vjp: tests/test_layers.py runs these cases
# over its full grid (registry.CASES merges registry_attention.CASES)


# --- attention against jax.nn.dot_product_attention ------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_equals_dot_product_attention(causal, x64):
    """Forward and backward against a forward built on jax.nn.dot_product_attention (float64 inputs)."""
    rng = np.random.default_rng(1)
    layer = MultiHeadAttention(2, causal=causal)
    x = _random(rng, (3, 6, 8), jnp.float64)
    params = make_params(layer, x, rng, jnp.float64)
    dy = _random(rng, x.shape, jnp.float64)

    def both(params, x, dy):
        y, cache = layer.forward(params, x)
        ref_y, vjp = jax.vjp(lambda p, x: _dpa_forward(layer, p, x), params, x)
        return y, layer.backward(params, cache, dy), ref_y, vjp(dy)

    y, (dparams, dx), ref_y, (ref_dparams, ref_dx) = jax.jit(both)(params, x, dy)
    np.testing.assert_allclose(y, ref_y, **DPA_TOLERANCE)
    chex.assert_trees_all_close(dparams, ref_dparams, **DPA_TOLERANCE)
    chex.assert_trees_all_close(dx, ref_dx, **DPA_TOLERANCE)
    # and in float64 proper, against the numpy formula (the dot_product_attention gap is its float32 softmax)
    np.testing.assert_allclose(y, reference_forward(layer, params, x), rtol=1e-12, atol=1e-12)


def test_causal_output_ignores_the_future(x64):
    """Changing the last position changes no earlier output; the full layer's earlier outputs do change."""
    rng = np.random.default_rng(2)
    x = _random(rng, (2, 5, 4), jnp.float64)
    x_changed = x.at[:, -1].add(1.0)
    for causal, same in ((True, True), (False, False)):
        layer = MultiHeadAttention(2, causal=causal)
        params = make_params(layer, x, rng, jnp.float64)
        before, after = (layer.apply(params, a)[:, :-1] for a in (x, x_changed))
        assert np.allclose(before, after, rtol=0, atol=1e-14) == same


# --- the cache: O(time), never (time, time) ----------------------------------------------------------------


def test_cache_holds_no_time_by_time_array():
    layer = MultiHeadAttention(2, head_dim=3, causal=True)
    time = 7  # differs from heads, head_dim and d_model, so only a score matrix could end in (7, 7)
    x = jnp.zeros((2, time, 5))
    _, cache = layer.forward(layer.init(jax.random.PRNGKey(0), x), x)
    shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(cache)]
    assert shapes and not [s for s in shapes if tuple(s[-2:]) == (time, time)], shapes


def test_cache_grows_linearly_in_time():
    """Cache bytes at time 128 and 512 (shapes only): exactly 4x, as O(batch heads time head_dim) must be."""
    layer = MultiHeadAttention(4, causal=True)
    small, large = (cache_bytes(layer, (8, time, 128)) for time in (128, 512))
    assert large == 4 * small
    # x, q, k, v, o (each time * d_model) and lse (heads * time) per example: 8 * 128 * (5 * 128 + 4) * 4 bytes
    assert small == 8 * 128 * (5 * 128 + 4) * 4


# --- per-example hooks against vmap of the layer's own backward -------------------------------------------

HOOK_CASES = {
    "MultiHeadAttention-causal": (MultiHeadAttention(2, causal=True), (4, 6)),
    "MultiHeadAttention-head_dim": (MultiHeadAttention(3, head_dim=2), (3, 5)),
    "RMSNorm": (RMSNorm(), (4, 5)),
    "PositionalEmbedding": (PositionalEmbedding(6), (4, 3)),
    "TransformerBlock": (TransformerBlock(2, mlp_ratio=2), (3, 4)),
}


@pytest.mark.parametrize("extra", [(), (2,)], ids=["batch", "batch-x2"])
@pytest.mark.parametrize("name", list(HOOK_CASES))
def test_per_example_hooks_equal_vmap(name, extra, x64):
    """sq_norms, dx and weighted grads of one batched walk against vmap of backward over single examples."""
    layer, feature_shape = HOOK_CASES[name]
    rng = np.random.default_rng(3)
    x = _random(rng, (5, *extra, *feature_shape), jnp.float64)
    params = make_params(layer, x, rng, jnp.float64)
    dy = _random(rng, x.shape, jnp.float64)
    weights = array(rng.uniform(size=5), jnp.float64)

    def paths(params, x, dy, weights):
        _, cache = layer.forward(params, x)
        sq_norms, dx, weighted_grads = call_per_example_backward(layer, params, cache, dy)
        hooks = {"sq_norms": layer.per_example_sq_norms(params, cache, dy)}
        if hasattr(layer, "per_example_weighted_grads"):
            hooks["weighted"] = layer.per_example_weighted_grads(params, cache, dy, weights)
        grads = jax.vmap(lambda x_i, dy_i: layer.backward(params, layer.forward(params, x_i)[1], dy_i)[0])(x, dy)
        return sq_norms, dx, weighted_grads(weights), hooks, grads, layer.backward(params, cache, dy)[1]

    sq_norms, dx, weighted, hooks, grads, ref_dx = jax.jit(paths)(params, x, dy, weights)
    ref_sq = sum(jnp.sum(g.reshape(5, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(grads))
    ref_weighted = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), grads)
    tolerance = {"rtol": 1e-10, "atol": 1e-10}
    chex.assert_trees_all_close(sq_norms, ref_sq, **tolerance)
    chex.assert_trees_all_close(hooks["sq_norms"], ref_sq, **tolerance)
    chex.assert_trees_all_close(dx, ref_dx, **tolerance)
    chex.assert_trees_all_close(weighted, ref_weighted, **tolerance)
    if "weighted" in hooks:
        chex.assert_trees_all_close(hooks["weighted"], ref_weighted, **tolerance)


# --- the checker on whole models -----------------------------------------------------------------------


def _gpt_example(dtype, batch=3, time=5, vocabulary=7, blocks=2):
    model = gpt(vocabulary, d_model=8, max_length=6, num_heads=2, blocks=blocks, dtype=dtype)
    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(0), 3)
    ids = jax.random.randint(key_x, (batch, time), 0, vocabulary)
    labels = jax.random.randint(key_y, (batch, time), 0, vocabulary)
    return model, fbp.SoftmaxCrossEntropy(), model.init(key_params, ids), ids, labels


def test_gpt_model_passes_check_gradients(x64):
    """Embedding, PositionalEmbedding, a block, RMSNorm, Dense head; cross-entropy over (batch, time, vocab)."""
    model, loss, params, ids, labels = _gpt_example(jnp.float64, blocks=1)
    assert model.apply(params, ids).shape == (3, 5, 7)
    report = fbp.check_gradients(model, loss, params, ids, labels)
    assert report.ok, str(report)


def test_gpt_ghost_clipping_equals_vmap(x64):
    """Per-example averaged and clipped gradients of the GPT model: one batched walk == vmap over examples."""
    model, loss, params, ids, labels = _gpt_example(jnp.float64, batch=4, blocks=1)

    def paths(params, ids, labels):
        return [
            (
                fbp.value_and_grad(model, loss, per_example=per_example)(params, ids, labels),
                clipped_value_and_grad(model, loss, 0.05, per_example=per_example)(params, ids, labels),
            )
            for per_example in (True, "vmap")
        ]

    fast, vmap = jax.jit(paths)(params, ids, labels)
    chex.assert_trees_all_close(fast, vmap, rtol=1e-10, atol=1e-12)
    assert float(fast[1][2].min()) > 0.05  # every example was clipped


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_configuration_and_input_name_the_layer():
    x = jnp.zeros((2, 4, 6))
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(4\): d_model 6 .* does not divide by num_heads 4"):
        MultiHeadAttention(4).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        MultiHeadAttention(0)
    layer = MultiHeadAttention(2)
    params = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(2\): expected x\[\.\.\., time, 6\], got shape"):
        layer.apply(params, jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(2\): expected x of rank >= 2"):
        layer.apply(params, jnp.zeros((6,)))
    with pytest.raises(TypeError, match="expected a floating-point x"):
        layer.apply(params, jnp.zeros((2, 4, 6), jnp.int32))
    positional = PositionalEmbedding(3)
    expected = r"PositionalEmbedding\(3\): expected at most 3 positions, got x of shape \(2, 4, 6\) \(time 4"
    with pytest.raises(ValueError, match=expected):
        positional.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"TransformerBlock\(4\): d_model 6"):
        TransformerBlock(4).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"TransformerBlock\(2\): expected params from TransformerBlock.init"):
        TransformerBlock(2).apply({}, x)


def test_transformer_block_children_are_its_two_residuals(x64):
    """children(): the inner Sequential's, with the params paths ([0], [1]) and the input each residual sees."""
    layer = TransformerBlock(2, mlp_ratio=2)
    rng = np.random.default_rng(4)
    x = _random(rng, (2, 3, 4), jnp.float64)
    params = make_params(layer, x, rng, jnp.float64)
    children = layer.children(params, x)
    assert [child.path for child in children] == ["[0]", "[1]"]
    assert all(isinstance(child.layer, fbp.Residual) for child in children)
    np.testing.assert_array_equal(children[0].x, x)
    np.testing.assert_allclose(children[1].x, children[0].layer.apply(params[0], x), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(children[1].layer.apply(params[1], children[1].x), layer.apply(params, x), rtol=1e-14)
