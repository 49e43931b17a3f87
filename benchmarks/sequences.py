"""Train-step benchmark of the sequence layers: GRU, LSTM and a small transformer.

    python -m benchmarks.sequences [--rounds 5] [--round-seconds 0.25] [--quick]

For each config, in interleaved rounds in one process (``fbp.bench.timing``):
the manual step (hand-written backward, reverse lax.scan / FlashAttention-style
recompute), the same model under jax.grad (``grad="autodiff"``: autodiff of
the same forward, a lax.scan for the recurrent cells, plain softmax attention),
for the transformer also jax.grad of the same model with its attention written
with ``jax.nn.dot_product_attention`` (the reference a JAX user would write),
the per-example averaged step and the clipped step, and (where installed)
JAX-Privacy's ``clipped_grad`` (a jax.vmap of per-example jax.grad of the same
forward, clipped and summed) followed by the same Adam update. Temp memory comes from
XLA's ``memory_analysis()`` of each compiled step; for the transformer, the
bytes of one attention layer's cache (from ``jax.eval_shape`` of its forward)
against what caching the (time x time) probabilities would take. Prints a
markdown table with the ratios the issues set as targets (manual <= 1.05x
autodiff, per-example <= 1.10x, clipped <= 1.5x the manual step).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics

import jax
import jax.numpy as jnp
import optax

import fbp
from fbp.bench.timing import Variant, measure

CONFIGS = {
    "gru b64 t50 f8 h64": {"kind": "gru", "batch": 64, "time": 50, "features": 8, "hidden": 64},
    "lstm b64 t50 f8 h64": {"kind": "lstm", "batch": 64, "time": 50, "features": 8, "hidden": 64},
    "lstm b64 t100 f8 h64": {"kind": "lstm", "batch": 64, "time": 100, "features": 8, "hidden": 64},
    "transformer d128 2 blocks t128 b8": {
        "kind": "transformer", "batch": 8, "time": 128, "d_model": 128, "blocks": 2, "vocab": 64,
    },
    "transformer d128 4 blocks t512 b2": {
        "kind": "transformer", "batch": 2, "time": 512, "d_model": 128, "blocks": 4, "vocab": 64,
    },
}
QUICK = {"gru b4 t5 f3 h8": {"kind": "gru", "batch": 4, "time": 5, "features": 3, "hidden": 8}}  # the smoke test
VARIANTS = {
    "manual": {"grad": "manual"},
    "autodiff (jax.grad)": {"grad": "autodiff"},
    "per_example": {"grad": "manual", "per_example": True},
    "per_example + clip": {"grad": "manual", "per_example": True, "clip_norm": 1.0},
}


class DotProductAttention(fbp.MultiHeadAttention):
    """MultiHeadAttention whose apply is ``jax.nn.dot_product_attention`` (same params): the autodiff reference."""

    def apply(self, params, x, *, key=None):
        heads = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
        bias = lambda y, b: y + jax.lax.broadcast_to_rank(b, y.ndim)
        q, k, v = (heads(bias(x @ params[f"W{n}"], params[f"b{n}"])) for n in "qkv")
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return bias(out.reshape(*x.shape[:-1], -1) @ params["Wo"], params["bo"])


class DotProductBlock(fbp.TransformerBlock):
    """TransformerBlock with DotProductAttention: the same params, for jax.grad."""

    def block(self, d_model: int) -> fbp.Sequential:
        blocks = super().block(d_model)
        attention = fbp.Sequential([fbp.RMSNorm(), DotProductAttention(self.num_heads, causal=self.causal)])
        return fbp.Sequential([fbp.Residual(attention), blocks.layers[1]])


def build(cfg: dict, block=fbp.TransformerBlock):
    """(model, loss, x, y) for one config: recurrent classifiers on the last state; a causal character LM."""
    key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
    if cfg["kind"] == "transformer":
        heads = 4 if cfg["d_model"] >= 64 else 2
        model = fbp.Sequential([
            fbp.Embedding(cfg["vocab"], cfg["d_model"]), fbp.PositionalEmbedding(cfg["time"]),
            *[block(heads) for _ in range(cfg["blocks"])], fbp.RMSNorm(), fbp.Dense(cfg["vocab"]),
        ])
        x = jax.random.randint(key_x, (cfg["batch"], cfg["time"]), 0, cfg["vocab"])
        y = jax.random.randint(key_y, (cfg["batch"], cfg["time"]), 0, cfg["vocab"])
        return model, fbp.SoftmaxCrossEntropy(), x, y
    cell = {"gru": fbp.GRU, "lstm": fbp.LSTM}[cfg["kind"]]
    model = fbp.Sequential([cell(cfg["hidden"], return_sequences=False), fbp.Dense(10)])
    x = jax.random.normal(key_x, (cfg["batch"], cfg["time"], cfg["features"]))
    y = jax.random.randint(key_y, (cfg["batch"],), 0, 10)
    return model, fbp.SoftmaxCrossEntropy(), x, y


DPA = "autodiff (dot_product_attention)"
JAX_PRIVACY = "JAX-Privacy clipped_grad"


def jax_privacy_variant(model, loss, params, x, y) -> Variant:
    """JAX-Privacy 2.0's clipped gradient of the same model (jax.vmap of per-example jax.grad), then Adam."""
    import jax_privacy

    clipped = jax_privacy.clipped_grad(lambda p, x, y: loss(model.apply(p, x), y), l2_clip_norm=1.0,
                                       batch_argnums=(1, 2), normalize_by=float(x.shape[0]))
    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = optimizer.update(clipped(params, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    holder = [(jax.tree_util.tree_map(jnp.array, params), optimizer.init(params))]

    def call():
        holder[0] = step(*holder[0])

    return Variant(JAX_PRIVACY, call, lambda: jax.block_until_ready(holder[0]), lambda: step.lower(*holder[0]))


def variants(cfg: dict) -> list[Variant]:
    model, loss, x, y = build(cfg)
    params = model.init(jax.random.PRNGKey(1), x)
    chosen = dict(VARIANTS)
    if cfg["kind"] == "transformer":
        chosen[DPA] = {"grad": "autodiff", "model": build(cfg, DotProductBlock)[0]}
    out = []
    for name, options in chosen.items():
        optimizer = optax.adam(1e-3)
        options = dict(options)
        step = fbp.make_train_step(options.pop("model", model), loss, optimizer, **options)
        holder = [fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(2))]

        def call(step=step, holder=holder):
            holder[0], _ = step(holder[0], x, y)

        out.append(Variant(name, call, lambda holder=holder: jax.block_until_ready(holder[0]),
                           lambda step=step, holder=holder: step.lower(holder[0], x, y)))
    if importlib.util.find_spec("jax_privacy") is not None:
        out.append(jax_privacy_variant(model, loss, params, x, y))
    return out


def attention_cache(cfg: dict) -> tuple[int, int]:
    """Bytes of one attention layer's cache (from shapes alone), and what caching the probabilities would take."""
    heads, (b, t, d) = 4 if cfg["d_model"] >= 64 else 2, (cfg["batch"], cfg["time"], cfg["d_model"])
    layer, x = fbp.MultiHeadAttention(heads, causal=True), jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    cache = jax.eval_shape(lambda p, x: layer.forward(p, x)[1], params, x)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(cache)), b * heads * t * t * 4


def table(name: str, results: dict, cfg: dict | None = None) -> str:
    median = {v: statistics.median(r["times"]) for v, r in results.items()}
    base = median["manual"]
    lines = [f"### {name}", "", "| variant | ms/step | vs manual | temp MiB |", "|---|---|---|---|"]
    for variant, seconds in median.items():
        temp = results[variant]["temp_bytes"]
        lines.append(f"| {variant} | {seconds * 1e3:.3f} | {seconds / base:.2f}x | "
                     f"{'n/a' if temp is None else f'{temp / 2**20:.2f}'} |")
    reference = DPA if DPA in median else "autodiff (jax.grad)"
    lines += ["", (f"targets: manual / {reference} = {base / median[reference]:.2f} (<= 1.05); "
              f"per_example / manual = {median['per_example'] / base:.2f} (<= 1.10); "
              f"clip / manual = {median['per_example + clip'] / base:.2f} (<= 1.5)"), ""]
    if JAX_PRIVACY in median:
        lines += [f"JAX-Privacy clipped_grad / fbp clipped = {median[JAX_PRIVACY] / median['per_example + clip']:.2f}", ""]
    if DPA in median:
        temps = {v: results[v]["temp_bytes"] for v in ("manual", DPA)}
        if None not in temps.values():
            lines += [f"temp memory: manual / {DPA} = {temps['manual'] / temps[DPA]:.2f} (<= 1.0)", ""]
        if cfg is not None:
            cached, probs = attention_cache(cfg)
            lines += [(f"attention cache per layer: {cached / 2**20:.2f} MiB (x, q, k, v, o: 5 b t d floats, and the "
                      f"row log-sum-exp, b h t); the (time x time) probabilities would be {probs / 2**20:.2f} MiB"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sequences", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="tiny configs, one round: a smoke test")
    args = parser.parse_args(argv)
    configs, rounds = (QUICK, 1) if args.quick else (CONFIGS, args.rounds)
    print(f"# Sequence-layer train steps\n\n- device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"jax {jax.__version__}; {platform.processor() or platform.machine()}\n- {rounds} interleaved rounds of "
          f"about {args.round_seconds} s per variant\n")
    for name, cfg in configs.items():
        print(table(name, measure(variants(cfg), rounds, args.round_seconds, log=lambda _: None), cfg), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
