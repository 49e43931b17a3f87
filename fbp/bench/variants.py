"""The ways to run one training step of a config: raw JAX, fbp's step in each mode, its epoch, Flax NNX, Equinox,
and JAX-Privacy's clipped step beside fbp's.

Every step trains with Adam on softmax cross-entropy. The raw-JAX step is the
floor: ``jax.value_and_grad`` + optax, returning the loss and the gradient norm
as fbp's step does; "raw-jax scan" is that step in a ``lax.scan`` over the
batches. fbp's mode rows run with ``skip_nonfinite=False``; "fbp default" is
``make_train_step``'s defaults (the non-finite guard on), and the
"fbp train_epoch (<strategy>)" rows run ``fbp.train_epoch`` over the default
step, as ``fbp train`` does. Flax NNX and Equinox steps are written as their
docs do (``nnx.jit``, ``eqx.filter_jit``) and return the loss. A peer that is
not installed is skipped, with the reason.

DP-SGD's clipping: "fbp per_example + clip" (ghost clipping through the hand-written
backward) against JAX-Privacy's ``clipped_grad`` (jax.vmap of per-example ``jax.grad``
of the raw-JAX model, clipped and summed, divided by the batch size), each followed by
the same Adam update, at clip norm 1 on the same batches; no noise in either (noise is
one Gaussian draw per parameter, the same cost for both). Before timing, the two
clipped gradients of the first batch are compared (``facts["jax_privacy_agreement"]``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import fbp
from fbp.bench.configs import LARGE, Config, equinox_model, fbp_model, nnx_model, raw_apply
from fbp.bench.timing import Variant, matmul_flops
from fbp.training.epoch import epoch_strategy

# per-example gradients materialised by vmap: skip the reference rows past this many floats
VMAP_LIMIT = 1e8
CLIP_VMAP_LIMIT = 2e7
JAX_PRIVACY = "jax-privacy"  # the rows "jax-privacy" and "jax-privacy (microbatch 32)"
JAX_PRIVACY_MICROBATCH = 32  # its microbatch_size where the whole batch's per-example gradients are large
CLIP_NORM = 1.0


def cross_entropy(logits, y):
    """Mean softmax cross-entropy on integer labels, in float32: the loss every non-fbp step trains on."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def _copy(tree):
    return jax.tree_util.tree_map(jnp.array, tree)


def _raw_step(cfg: Config, optimizer):
    """The raw-JAX step ``(params, opt_state, count, x, y) -> (..., metrics)``; under a mixed precision the
    params and x are cast to the compute dtype inside the loss, as jmp users write it."""

    def loss_fn(params, x, y):
        if cfg.precision != "float32":
            params, x = jax.tree_util.tree_map(lambda a: a.astype(cfg.compute_dtype), (params, x))
        return cross_entropy(raw_apply(cfg, params, x), y)

    def step(params, opt_state, count, x, y):
        value, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, count + 1, metrics

    return step


def raw_variant(cfg: Config, params, optimizer, batches) -> Variant:
    """``jax.value_and_grad`` + optax, jitted with the state donated: the floor."""
    params = _copy([p for p in params if p])
    jitted = jax.jit(_raw_step(cfg, optimizer), donate_argnums=(0, 1, 2))
    state = [(params, optimizer.init(params), jnp.zeros((), jnp.int32))]
    cycle = itertools.cycle(batches)

    def call():
        *state[0], _ = jitted(*state[0], *next(cycle))

    return Variant("raw-jax", call, lambda: jax.block_until_ready(state[0]), lambda: jitted.lower(*state[0], *batches[0]))


def raw_scan_variant(cfg: Config, params, optimizer, batches) -> Variant:
    """The raw-JAX step in one ``lax.scan`` over the stacked batches: the floor for an epoch."""
    params = _copy([p for p in params if p])
    step = _raw_step(cfg, optimizer)

    def epoch(carry, xs, ys):
        def body(carry, batch):
            *carry, metrics = step(*carry, *batch)
            return tuple(carry), metrics

        return jax.lax.scan(body, carry, (xs, ys))

    jitted = jax.jit(epoch, donate_argnums=0)
    state = [(params, optimizer.init(params), jnp.zeros((), jnp.int32))]
    xs, ys = (jnp.stack(column) for column in zip(*batches))

    def call():
        state[0], _ = jitted(state[0], xs, ys)

    return Variant("raw-jax scan", call, lambda: jax.block_until_ready(state[0]), steps_per_call=len(batches))


def matmul_chain_variant(cfg: Config, params, batches) -> Variant:
    """The step's matmuls and nothing else (an mlp): the forward chain, then each dW = a^T dz and dx = dz W^T
    in the backward's order. Its FLOP/s is the ceiling for the step's; the gap is what the step runs besides."""
    weights = [p["W"] for p in params if p]

    def chain(weights, x):
        activations = [x]
        for W in weights:
            activations.append(activations[-1] @ W)
        dz, grads = activations[-1], []
        for i in reversed(range(len(weights))):
            grads.append(activations[i].T @ dz)
            if i:
                dz = dz @ weights[i].T
        return grads

    jitted = jax.jit(chain)
    out, cycle = [None], itertools.cycle(batches)

    def call():
        out[0] = jitted(weights, next(cycle)[0])

    return Variant("matmuls only", call, lambda: jax.block_until_ready(out[0]), lambda: jitted.lower(weights, batches[0][0]))


def fbp_variant(name, model, loss, optimizer, params, batches, **options) -> Variant:
    """``fbp.make_train_step(..., **options)`` called in a Python loop."""
    step = fbp.make_train_step(model, loss, optimizer, **{"skip_nonfinite": False, **options})
    state = [fbp.TrainState.create(params, optimizer)]
    cycle = itertools.cycle(batches)

    def call():
        state[0], _ = step(state[0], *next(cycle))

    return Variant(name, call, lambda: jax.block_until_ready(state[0]), lambda: step.lower(state[0], *batches[0]))


def fbp_epoch_variant(model, loss, optimizer, params, batches, strategy: str, **options) -> Variant:
    """``fbp.train_epoch(..., strategy=strategy)`` over the default (guarded) step, as ``fbp train`` runs it."""
    step = fbp.make_train_step(model, loss, optimizer, **options)
    state = [fbp.TrainState.create(params, optimizer)]
    xs, ys = (jnp.stack(column) for column in zip(*batches))

    def call():
        state[0], _ = fbp.train_epoch(step, state[0], xs, ys, strategy=strategy)

    return Variant(f"fbp train_epoch ({strategy})", call, lambda: jax.block_until_ready(state[0]),
                   steps_per_call=len(batches))


def auto_strategy(model, loss, optimizer, params, batches, **options) -> str:
    """What ``train_epoch(strategy="auto")`` picks for this config here (``fbp.training.epoch_strategy``)."""
    step = fbp.make_train_step(model, loss, optimizer, **options)
    xs, ys = (jnp.stack(column) for column in zip(*batches))
    return epoch_strategy(step, fbp.TrainState.create(params, optimizer), xs, ys)


def precision_agreement(model, loss, optimizer, params, batches, precision: str, steps: int = 16) -> dict:
    """Train ``steps`` steps from the same start at float32 and at ``precision``: the losses and their gap.

    Returns:
      ``{"steps", "float32_loss", "loss", "relative_gap", "max_relative_gap"}``: the mean loss of the last
      quarter of steps at each precision, their relative difference, and the largest per-step gap.
    """
    losses = {}
    for name in ("float32", precision):
        step = fbp.make_train_step(model, loss, optimizer, precision=name)
        state, history = fbp.TrainState.create(params, optimizer), []
        for i in range(steps):
            state, metrics = step(state, *batches[i % len(batches)])
            history.append(metrics["loss"])
        losses[name] = jnp.stack(history)
    reference, low = losses["float32"], losses[precision]
    tail = max(1, steps // 4)
    ref_tail, low_tail = float(reference[-tail:].mean()), float(low[-tail:].mean())
    return {
        "steps": steps,
        "float32_loss": ref_tail,
        "loss": low_tail,
        "relative_gap": abs(low_tail - ref_tail) / abs(ref_tail),
        "max_relative_gap": float(jnp.max(jnp.abs(low - reference) / jnp.abs(reference))),
    }


def nnx_variant(cfg: Config, optimizer, batches) -> Variant:
    """Flax NNX: ``nnx.jit`` over a step that updates model and optimizer in place."""
    from flax import nnx

    model = nnx_model(cfg)
    nnx_optimizer = nnx.Optimizer(model, optimizer, wrt=nnx.Param)

    @nnx.jit
    def step(model, nnx_optimizer, x, y):
        value, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        nnx_optimizer.update(model, grads)
        return value

    cycle = itertools.cycle(batches)
    return Variant(
        "flax-nnx",
        lambda: step(model, nnx_optimizer, *next(cycle)),
        lambda: jax.block_until_ready(nnx.state(nnx_optimizer)),
        lambda: step.lower(model, nnx_optimizer, *batches[0]),
    )


def equinox_variant(cfg: Config, optimizer, batches) -> Variant:
    """Equinox: ``eqx.filter_jit`` over ``filter_value_and_grad`` + optax, per-example modules vmapped."""
    import equinox as eqx

    if cfg.kind == "cnn":  # Equinox convolutions take one (C, H, W) image
        batches = [(jnp.moveaxis(x, -1, 1), y) for x, y in batches]
    model = equinox_model(cfg)
    state = [(model, optimizer.init(eqx.filter(model, eqx.is_array)))]

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(lambda m: cross_entropy(jax.vmap(m)(x), y))(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    cycle = itertools.cycle(batches)

    def call():
        *state[0], _ = step(*state[0], *next(cycle))

    return Variant(
        "equinox", call, lambda: jax.block_until_ready(state[0]), lambda: step.lower(*state[0], *batches[0])
    )


@dataclasses.dataclass(frozen=True)
class Peer:
    """Another library's row: its name in the tables, the module it needs, the pip package that has it."""

    name: str
    module: str
    package: str
    build: Callable[..., Variant]


PEERS = (Peer("flax-nnx", "flax.nnx", "flax", nnx_variant), Peer("equinox", "equinox", "equinox", equinox_variant))


def unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot run here (``"flax is not installed (pip install flax)"``), or None when it can."""
    if importlib.util.find_spec(peer.module.partition(".")[0]) is None:  # the import name, not the pip name
        return f"{peer.package} is not installed (pip install {peer.package})"
    try:
        importlib.import_module(peer.module)
    except ImportError as error:
        return f"cannot import {peer.module}: {error} (pip install -U {peer.package})"
    return None


def jax_privacy_step(cfg: Config, optimizer, microbatch_size: int | None = None):
    """JAX-Privacy's DP step without noise: ``jax_privacy.clipped_grad`` of the raw-JAX loss (per-example
    gradients by jax.vmap, clipped to ``CLIP_NORM``, summed, divided by the batch size), then ``optimizer``.
    Returns ``(clipped_grad_fn, step)`` with ``step(params, opt_state, count, x, y) -> (..., loss)``."""
    import jax_privacy

    def loss_fn(params, x, y):
        return cross_entropy(raw_apply(cfg, params, x), y)

    clipped = jax_privacy.clipped_grad(loss_fn, l2_clip_norm=CLIP_NORM, batch_argnums=(1, 2),
                                       normalize_by=float(cfg.batch), microbatch_size=microbatch_size,
                                       return_values=True)

    def step(params, opt_state, count, x, y):
        grads, aux = clipped(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, count + 1, aux.values.mean()

    return clipped, step


def jax_privacy_variant(cfg: Config, params, optimizer, batches, microbatch_size: int | None = None) -> Variant:
    """JAX-Privacy's clipped step, jitted with the state donated (as the raw-JAX step)."""
    params = _copy([p for p in params if p])
    jitted = jax.jit(jax_privacy_step(cfg, optimizer, microbatch_size)[1], donate_argnums=(0, 1, 2))
    state = [(params, optimizer.init(params), jnp.zeros((), jnp.int32))]
    cycle = itertools.cycle(batches)

    def call():
        *state[0], _ = jitted(*state[0], *next(cycle))

    name = JAX_PRIVACY if microbatch_size is None else f"{JAX_PRIVACY} (microbatch {microbatch_size})"
    return Variant(name, call, lambda: jax.block_until_ready(state[0]), lambda: jitted.lower(*state[0], *batches[0]))


def jax_privacy_agreement(cfg: Config, model, loss, params, batch, microbatch_size: int | None = None) -> dict:
    """fbp's clipped mean gradient against JAX-Privacy's on one batch: the largest difference of any element,
    absolute and relative to the largest element (float32: a few 1e-7 is rounding)."""
    x, y = batch
    _, ours, _ = jax.jit(fbp.grads.clipped_value_and_grad(model, loss, CLIP_NORM))(params, x, y)
    theirs, _ = jax.jit(jax_privacy_step(cfg, optax.adam(1e-3), microbatch_size)[0])([p for p in params if p], x, y)
    ours, theirs = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    largest = max(float(jnp.max(jnp.abs(b))) for b in theirs)
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ours, theirs, strict=True))
    return {"max_abs_difference": difference, "relative": difference / largest}


def jax_privacy_microbatches(cfg: Config, num_params: int) -> list[int | None]:
    """The JAX-Privacy rows of a config: plain (every per-example gradient at once) up to ``VMAP_LIMIT`` floats,
    and with ``microbatch_size`` 32 (JAX-Privacy's memory knob) past ``CLIP_VMAP_LIMIT``."""
    rows = []
    if cfg.batch * num_params <= VMAP_LIMIT:
        rows.append(None)
    if cfg.batch > JAX_PRIVACY_MICROBATCH and cfg.batch * num_params > CLIP_VMAP_LIMIT:
        rows.append(JAX_PRIVACY_MICROBATCH)
    return rows


# DP-SGD's peer: its rows are built by build_variants (they need the params), not by ``build``
DP_PEER = Peer(JAX_PRIVACY, "jax_privacy", "jax-privacy", jax_privacy_variant)


def skipped_peers(peers: bool = True) -> dict[str, str]:
    """``{peer name: why it is skipped}`` for each peer that will not run (all of them when ``peers`` is False)."""
    if not peers:
        return {peer.name: "--no-frameworks was given" for peer in (*PEERS, DP_PEER)}
    reasons = {peer.name: unavailable(peer) for peer in (*PEERS, DP_PEER)}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def make_batches(cfg: Config, key_x: jax.Array, key_y: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """``cfg.num_batches`` batches of standard normal inputs and uniform integer labels."""
    keys = zip(jax.random.split(key_x, cfg.num_batches), jax.random.split(key_y, cfg.num_batches))
    dtype = jnp.dtype(cfg.dtype)
    return [
        (jax.random.normal(kx, cfg.input_shape, dtype), jax.random.randint(ky, (cfg.batch,), 0, cfg.classes))
        for kx, ky in keys
    ]


def build_variants(cfg: Config, skip: frozenset[str] | set[str] = frozenset()) -> tuple[list[Variant], dict]:
    """Every variant of a config but the peers named in ``skip``, and facts about it.

    Facts: ``model_flops``, ``num_params``, ``epoch_strategy`` (what ``train_epoch`` picks here), and for a
    mixed-precision config ``precision``, the agreement of its training loss with float32's.
    """
    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(0), 3)
    batches = make_batches(cfg, key_x, key_y)
    model, loss, optimizer = fbp_model(cfg), fbp.SoftmaxCrossEntropy(), optax.adam(1e-3)
    params = model.init(key_params, batches[0][0])
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    dense_params = [p for p in params if p]
    flops = matmul_flops(jax.grad(lambda p, x, y: cross_entropy(raw_apply(cfg, p, x), y)), dense_params, *batches[0])
    common = (model, loss, optimizer, params, batches)
    precision = {"precision": cfg.precision}
    strategy = auto_strategy(*common, **precision)
    facts = {"model_flops": flops, "num_params": num_params, "epoch_strategy": strategy}
    variants = [
        raw_variant(cfg, params, optimizer, batches),
        raw_scan_variant(cfg, params, optimizer, batches),
        fbp_variant("fbp manual", *common, **precision),
        fbp_variant("fbp default", *common, skip_nonfinite=True, **precision),
    ]
    if cfg.precision != "float32":  # a mixed-precision config: its cost against float32, and its agreement
        variants.append(fbp_variant("fbp float32", *common))
        facts["precision"] = precision_agreement(*common, cfg.precision)
    else:
        variants += [
            fbp_variant("fbp autodiff", *common, grad="autodiff"),
            fbp_variant("fbp custom_vjp", *common, grad="custom_vjp"),
            fbp_variant("fbp per_example", *common, per_example=True),
            fbp_variant("fbp per_example + clip", *common, per_example=True, clip_norm=CLIP_NORM),
        ]
        if cfg.batch * num_params <= VMAP_LIMIT:
            variants.append(fbp_variant("fbp per_example (vmap)", *common, per_example="vmap"))
        if cfg.batch * num_params <= CLIP_VMAP_LIMIT:
            variants.append(fbp_variant("fbp per_example + clip (vmap)", *common, per_example="vmap", clip_norm=1.0))
    variants.append(fbp_epoch_variant(*common, strategy, **precision))
    if cfg.kind == "mlp":  # the strategy not picked, to show the pick (a CNN's scan on CPU runs for minutes)
        variants.append(fbp_epoch_variant(*common, "loop" if strategy == "scan" else "scan", **precision))
    if cfg.name == LARGE or cfg.smoke:
        variants.append(matmul_chain_variant(cfg, params, batches))
    if cfg.precision == "float32":
        variants += [peer.build(cfg, optimizer, batches) for peer in PEERS if peer.name not in skip]
        if DP_PEER.name not in skip:
            microbatches = jax_privacy_microbatches(cfg, num_params)
            if microbatches:
                facts["jax_privacy_agreement"] = jax_privacy_agreement(cfg, model, loss, params, batches[0],
                                                                       microbatches[0])
            variants += [jax_privacy_variant(cfg, params, optimizer, batches, m) for m in microbatches]
    return variants, facts
