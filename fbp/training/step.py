"""Training: a pytree TrainState, a jitted train step, a scan-fused epoch, evaluation.

    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, loss, optimizer, grad="manual")
    state, metrics = step(state, x, y)          # jitted once per input shape
    state, history = fbp.train_epoch(step, state, xs, ys)   # xs: (num_batches, batch, ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fbp import parallel
from fbp.grads import MODES, check_batch, clipped_value_and_grad, value_and_grad
from fbp.grads import clip_and_average as clip_and_average  # noqa: PLC0414 - explicit re-export: it lived here before
from fbp.layers.base import describe
from fbp.losses import MSE, SoftmaxCrossEntropy


class TrainState(NamedTuple):
    """Everything a step changes, as one pytree.

    Attributes:
      params: the model's parameters.
      opt_state: the optax optimizer's state.
      step: number of updates applied so far (int32 scalar).
      rng: a PRNG key for dropout and DP noise, or None when nothing is random.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array | None = None

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array | None = None) -> TrainState:
        """A fresh state: ``optimizer.init(params)``, step 0.

        The state holds copies of ``params``: the train step donates its input
        state, and the caller's arrays must survive that.
        """
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(f"TrainState.create: expected an optax GradientTransformation, got {type(optimizer).__name__}")
        params = jax.tree_util.tree_map(jnp.array, params)  # jnp.array copies
        rng = None if rng is None else jnp.array(rng)
        return cls(params, optimizer.init(params), jnp.zeros((), jnp.int32), rng)

    def replace(self, **changes) -> TrainState:
        return self._replace(**changes)


def add_dp_noise(grads, key, *, clip_norm: float, noise_multiplier: float, batch_size: int):
    """Gaussian mechanism of DP-SGD (Abadi et al. 2016): mean + N(0, (sigma C)^2) / B per element."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, len(leaves))
    std = noise_multiplier * clip_norm / batch_size
    noisy = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)]
    return treedef.unflatten(noisy)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A jitted ``step(state, x, y) -> (state, metrics)``; ``.pure`` is the un-jitted function.

    Call it like a function. ``train_epoch`` scans ``.pure`` over a stack of batches.
    """

    pure: Callable
    model: Any
    donate: bool = True
    mesh: Mesh | None = None

    def __post_init__(self):
        donate = 0 if self.donate else ()
        step_shardings = {} if self.mesh is None else parallel.jit_shardings(self.mesh, batch_axis=0)
        epoch_shardings = {} if self.mesh is None else parallel.jit_shardings(self.mesh, batch_axis=1)
        object.__setattr__(self, "_jitted", jax.jit(self.pure, donate_argnums=donate, **step_shardings))
        object.__setattr__(self, "_epoch", jax.jit(_scan_epoch(self.pure), donate_argnums=donate, **epoch_shardings))

    def __call__(self, state: TrainState, x, y):
        check_batch(self.model, x, y)
        if self.mesh is not None:
            state, x, y = parallel.place(self.mesh, state, x, y)
        return self._jitted(state, x, y)

    def lower(self, state, x, y):
        """``jax.jit(...).lower`` for cost and memory analysis."""
        if self.mesh is not None:
            state, x, y = parallel.place(self.mesh, state, x, y)
        return self._jitted.lower(state, x, y)


def _scan_epoch(pure):
    def epoch(state, xs, ys):
        return jax.lax.scan(lambda s, batch: pure(s, *batch), state, (xs, ys))

    return epoch


def make_train_step(
    model,
    loss,
    optimizer: optax.GradientTransformation,
    *,
    grad: str = "manual",
    per_example: bool = False,
    clip_norm: float | None = None,
    noise_multiplier: float | None = None,
    skip_nonfinite: bool = True,
    donate: bool = True,
    mesh: Mesh | None = None,
) -> TrainStep:
    """Build the jitted train step ``step(state, x, y) -> (state, metrics)``.

    Args:
      model: any layer.
      loss: a loss from ``fbp.losses``.
      optimizer: any optax GradientTransformation.
      grad: ``"manual"`` (the hand-written backward), ``"autodiff"`` (jax.grad) or
        ``"custom_vjp"`` (jax.grad through ``fbp.with_manual_vjp``).
      per_example: per-example gradients by jax.vmap over single examples, averaged.
      clip_norm: with per_example, clip each example's gradient to this global L2
        norm before averaging (DP-SGD).
      noise_multiplier: with clip_norm, add N(0, (noise_multiplier clip_norm)^2)
        to the summed gradient (Abadi et al. 2016); needs ``state.rng``.
      skip_nonfinite: when the loss or a gradient is NaN/Inf, keep the old
        params and optimizer state (``metrics["finite"]`` is False) so a bad
        batch never poisons the parameters. The caller decides whether to stop.
      donate: donate the old state's buffers to the new one.
      mesh: data parallelism (``fbp.parallel.make_mesh``): split the batch over
        the mesh's devices, replicate the state, average the gradient across
        devices. Equals one device on the same global batch; the batch must
        divide by ``mesh.size``.

    Returns:
      A TrainStep. ``metrics`` holds ``loss``, ``grad_norm`` (of the applied
      gradient), ``finite``, and with clipping ``clipped_fraction``.
    """
    if grad not in MODES:
        raise ValueError(f"make_train_step: grad must be one of {MODES}, got {grad!r}")
    if clip_norm is not None and not per_example:
        raise ValueError("make_train_step: clip_norm clips per-example gradients; pass per_example=True too")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"make_train_step: clip_norm must be > 0, got {clip_norm!r}")
    if noise_multiplier is not None and clip_norm is None:
        raise ValueError("make_train_step: noise_multiplier needs clip_norm (noise is scaled by it)")
    takes_key = bool(getattr(model, "takes_key", False))
    needs_rng = takes_key or noise_multiplier is not None
    if clip_norm is None:
        compute = value_and_grad(model, loss, mode=grad, per_example=per_example)
    else:
        clipped = clipped_value_and_grad(model, loss, clip_norm, mode=grad, per_example=per_example)

    def pure(state: TrainState, x, y):
        if needs_rng and state.rng is None:
            raise ValueError(
                f"{describe(model)}: this step needs randomness (dropout or DP noise); "
                "create the state with TrainState.create(params, optimizer, rng=jax.random.PRNGKey(seed))"
            )
        rng = state.rng
        if needs_rng:
            rng, dropout_key, noise_key = jax.random.split(rng, 3)
        dropout_key = dropout_key if takes_key else None
        metrics = {}
        if clip_norm is None:
            value, grads = compute(state.params, x, y, dropout_key)
        else:
            value, grads, norms = clipped(state.params, x, y, dropout_key)
            metrics["clipped_fraction"] = jnp.mean(norms > clip_norm)
            if noise_multiplier is not None:
                grads = add_dp_noise(
                    grads, noise_key, clip_norm=clip_norm, noise_multiplier=noise_multiplier, batch_size=x.shape[0]
                )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params, opt_state, state.step + 1, rng)
        metrics["loss"] = value
        metrics["grad_norm"] = optax.tree.norm(grads)
        if skip_nonfinite:
            finite = jnp.isfinite(value) & _all_finite(grads)
            keep_old = state.replace(rng=rng)  # advance the key even when skipping
            new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, keep_old)
            metrics["finite"] = finite
        return new_state, metrics

    return TrainStep(pure, model, donate, mesh)


def train_epoch(step: TrainStep, state: TrainState, xs, ys):
    """Run a whole epoch of batches in one compiled program (lax.scan over the step).

    Args:
      step: from ``make_train_step``.
      state: the TrainState.
      xs: ``(num_batches, batch, ...)`` device-resident inputs.
      ys: ``(num_batches, batch, ...)`` targets.

    Returns:
      (state, metrics) with every metric stacked over batches: ``(num_batches,)``.
    """
    if not isinstance(step, TrainStep):
        raise TypeError(f"train_epoch: expected the TrainStep from make_train_step, got {type(step).__name__}")
    xs_shape, ys_shape = jnp.shape(xs), jnp.shape(ys)
    if len(xs_shape) < 2 or len(ys_shape) < 2 or xs_shape[:2] != ys_shape[:2]:
        raise ValueError(
            f"train_epoch: expected xs (num_batches, batch, ...) and ys with the same two leading axes, "
            f"got {xs_shape} and {ys_shape}"
        )
    if step.mesh is not None:
        state, xs, ys = parallel.place(step.mesh, state, xs, ys, batch_axis=1)
    return step._epoch(state, xs, ys)


def _default_loss(y):
    return SoftmaxCrossEntropy() if jnp.issubdtype(jnp.result_type(y), jnp.integer) else MSE()


def _accuracy_count(pred, y):
    if jnp.issubdtype(y.dtype, jnp.integer):
        if pred.shape == y.shape:  # one logit per binary target
            return jnp.sum((pred > 0) == (y > 0))
        return jnp.sum(jnp.argmax(pred, -1) == y)
    if pred.shape[-1] > 1:  # one-hot / probabilities
        return jnp.sum(jnp.argmax(pred, -1) == jnp.argmax(y, -1))
    return jnp.sum((pred > 0) == (y > 0.5))


_EVAL_CACHE: dict = {}


def evaluate(model, params, x, y, *, loss=None, metrics=("loss", "accuracy"), batch_size: int = 1024) -> dict:
    """Mean loss and accuracy over a data set, in jitted batches.

    Args:
      model: the layer.
      params: its parameters.
      x: ``(n, ...)`` inputs. y: ``(n, ...)`` targets.
      loss: defaults to SoftmaxCrossEntropy for integer labels, else MSE.
      metrics: any of ``"loss"``, ``"accuracy"`` (argmax vs label; sign for one logit).
      batch_size: examples per compiled batch (the tail runs as one smaller batch).

    Returns:
      {name: float}.
    """
    check_batch(model, x, y)
    unknown = set(metrics) - {"loss", "accuracy"}
    if unknown:
        raise ValueError(f"evaluate: unknown metrics {sorted(unknown)}; choose from ['accuracy', 'loss']")
    loss = _default_loss(y) if loss is None else loss
    key = (model, loss)
    if key not in _EVAL_CACHE:

        def sums(params, x, y):
            pred = model.apply(params, x)
            return loss(pred, y) * x.shape[0], _accuracy_count(pred, y)

        _EVAL_CACHE[key] = jax.jit(sums)
    sums = _EVAL_CACHE[key]
    n = jnp.shape(x)[0]
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch_loss, batch_correct = sums(params, x[start : start + batch_size], y[start : start + batch_size])
        total_loss += float(batch_loss)
        correct += int(batch_correct)
    out = {"loss": total_loss / n, "accuracy": correct / n}
    return {name: out[name] for name in metrics}
