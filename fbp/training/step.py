"""The train step: a pytree TrainState and a jitted ``step(state, x, y[, mask]) -> (state, metrics)``.

    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, loss, optimizer, grad="manual")    # precision="bfloat16" for mixed
    state, metrics = step(state, x, y)          # jitted once per input shape
    state, metrics = step(state, x, y, mask)    # a padded batch: only the examples where mask count

An epoch of steps is ``epoch.train_epoch``, the precision policy ``precision.Policy``,
evaluation ``evaluate.evaluate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from fbp import parallel
from fbp.grads import (
    check_batch,
    check_grad_mode,
    check_is_layer,
    check_is_loss,
    check_mask,
    check_normalize_by,
    clipped_value_and_grad,
)
from fbp.grads import clip_and_average as clip_and_average  # noqa: PLC0414 - explicit re-export: it lived here before
from fbp.layers.base import describe, uses_key
from fbp.training.precision import Policy, PolicyLoss, get_policy, unscale, value_and_grad_with_policy


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
        if params is None:
            raise TypeError("TrainState.create: params is None; pass the params that model.init(key, x) returned")
        _check_optimizer(optimizer, "TrainState.create")
        params = jax.tree_util.tree_map(jnp.array, params)  # jnp.array copies
        rng = None if rng is None else jnp.array(rng)
        return cls(params, optimizer.init(params), jnp.zeros((), jnp.int32), rng)

    def replace(self, **changes) -> TrainState:
        return self._replace(**changes)


def _check_optimizer(optimizer, where: str) -> None:
    """Raise TypeError unless ``optimizer`` is an optax GradientTransformation (its init and update callable)."""
    if isinstance(optimizer, optax.GradientTransformation) or (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        return
    name = getattr(optimizer, "__name__", None)
    hint = f"; did you forget to call it: {name}(learning_rate)?" if callable(optimizer) and name else ""
    raise TypeError(
        f"{where}: expected an optax GradientTransformation (with init and update), got {type(optimizer).__name__}"
        f"{hint}"
    )


def add_dp_noise(grads, key, *, clip_norm: float, noise_multiplier: float, batch_size):
    """Gaussian mechanism of DP-SGD (Abadi et al. 2016): mean + N(0, (sigma C)^2) / B per element.

    ``grads`` is the clipped sum divided by ``batch_size`` = B, so this adds N(0, (sigma C)^2) to the sum
    before the division. With Poisson sampling B is the expected batch size q N, a constant.
    """
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, len(leaves))
    std = noise_multiplier * clip_norm / batch_size
    noisy = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)]
    return treedef.unflatten(noisy)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def grads_finite(grad_norm: jax.Array, grads) -> jax.Array:
    """Whether every gradient leaf is finite, read from the gradient norm the step computes anyway.

    A NaN or Inf in any leaf makes the norm non-finite, so a finite norm needs
    no other check. A non-finite norm from finite leaves (their squares
    overflow, past ~1.8e19 in float32) is told apart by checking each leaf,
    which runs only then (``lax.cond``).
    """
    return lax.cond(jnp.isfinite(grad_norm), lambda tree: jnp.array(True), _all_finite, grads)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A jitted ``step(state, x, y, mask=None) -> (state, metrics)``; ``.pure`` is the un-jitted function.

    Call it like a function. ``train_epoch`` runs ``.pure`` over a stack of
    batches, as one ``lax.scan`` or as a loop of jitted steps (``epoch_strategy``).
    A ``mask: (batch,)`` (bool) marks the real examples of a padded batch (Poisson
    sampling): the others contribute nothing (see ``make_train_step``). Without a
    mask the step runs the program it always ran.

    Attributes:
      pure: ``(state, x, y, mask=None) -> (state, metrics)``, traceable.
      model: the layer (for error messages and the epoch strategy).
      donate: donate the input state's buffers.
      mesh: data parallelism, or None.
      policy: the precision policy the step was built with (``get_policy``).
      strategies: how ``train_epoch`` runs each epoch signature, ``"scan"`` or ``"loop"``
        (filled by ``epoch_strategy``, once per signature).
    """

    pure: Callable
    model: Any
    donate: bool = True
    mesh: Mesh | None = None
    policy: Policy = Policy()  # noqa: RUF009 - frozen: one shared default is safe
    strategies: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        donate = 0 if self.donate else ()
        step_shardings = {} if self.mesh is None else parallel.jit_shardings(self.mesh, batch_axis=0)
        epoch_shardings = {} if self.mesh is None else parallel.jit_shardings(self.mesh, batch_axis=1)
        object.__setattr__(self, "_jitted", jax.jit(self.pure, donate_argnums=donate, **step_shardings))
        object.__setattr__(self, "_epoch", jax.jit(_scan_epoch(self.pure), donate_argnums=donate, **epoch_shardings))
        # masked batches: one more input, split like x and y
        masked_step, masked_epoch = (_with_mask_sharding(shardings) for shardings in (step_shardings, epoch_shardings))
        object.__setattr__(self, "_jitted_masked", jax.jit(self.pure, donate_argnums=donate, **masked_step))
        object.__setattr__(
            self, "_epoch_masked", jax.jit(_scan_epoch(self.pure, masked=True), donate_argnums=donate, **masked_epoch)
        )
        object.__setattr__(self, "_checked", set())  # (shape, dtype) signatures of x and y that check_batch passed

    def __call__(self, state: TrainState, x, y, mask=None):
        signature = _signature(x, y, mask)
        if signature is None or signature not in self._checked:  # Python-side checks once per new signature
            check_batch(self.model, x, y)
            if mask is not None:
                check_mask(self.model, x, mask)
            if signature is not None:
                self._checked.add(signature)
        if mask is None:
            if self.mesh is not None:
                state, x, y = parallel.place(self.mesh, state, x, y)
            return self._jitted(state, x, y)
        if self.mesh is not None:
            state, x, y = parallel.place(self.mesh, state, x, y)
            mask = parallel.shard_batch(self.mesh, mask, 0)
        return self._jitted_masked(state, x, y, mask)

    def compiled(self, *, masked: bool = False) -> Callable:
        """The jitted step program, ``(state, x, y)`` or with ``masked`` ``(state, x, y, mask)``: no checks, no
        placement (for a loop over batches already checked and placed, as ``train_epoch`` runs)."""
        return self._jitted_masked if masked else self._jitted

    def scan(self, state: TrainState, xs, ys, masks=None):
        """The jitted epoch: ``lax.scan`` of ``pure`` over ``(num_batches, batch, ...)`` stacks (already placed)."""
        return self._epoch(state, xs, ys) if masks is None else self._epoch_masked(state, xs, ys, masks)

    def lower(self, state, x, y, mask=None):
        """``jax.jit(...).lower`` for cost and memory analysis."""
        if self.mesh is not None:
            state, x, y = parallel.place(self.mesh, state, x, y)
            mask = None if mask is None else parallel.shard_batch(self.mesh, mask, 0)
        if mask is None:
            return self._jitted.lower(state, x, y)
        return self._jitted_masked.lower(state, x, y, mask)


def _with_mask_sharding(shardings: dict) -> dict:
    """jit shardings of ``f(state, x, y)`` extended to ``f(state, x, y, mask)``: the mask split like x."""
    if not shardings:
        return {}
    state, x, y = shardings["in_shardings"]
    return {**shardings, "in_shardings": (state, x, y, x)}


def _signature(x, y, mask=None):
    """``(x.shape, x.dtype, y.shape, y.dtype[, mask's])`` for arrays, else None (check every call)."""
    try:
        signature = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        return signature if mask is None else (*signature, tuple(mask.shape), mask.dtype)
    except AttributeError:
        return None


def _scan_epoch(pure, masked: bool = False):
    if masked:

        def epoch_masked(state, xs, ys, masks):
            return jax.lax.scan(lambda s, batch: pure(s, *batch), state, (xs, ys, masks))

        return epoch_masked

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
    normalize_by: float | None = None,
    skip_nonfinite: bool = True,
    donate: bool = True,
    mesh: Mesh | None = None,
    precision: str | Policy = "float32",
) -> TrainStep:
    """Build the jitted train step ``step(state, x, y, mask=None) -> (state, metrics)``.

    Args:
      model: any layer.
      loss: a loss from ``fbp.losses``.
      optimizer: any optax GradientTransformation.
      grad: ``"manual"`` (the hand-written backward), ``"autodiff"`` (jax.grad) or
        ``"custom_vjp"`` (jax.grad through ``fbp.with_manual_vjp``).
      per_example: ``True``: each example's gradient on its own, in one backward over the
        batch through the layers' per-example hooks (``fbp.value_and_grad``), averaged;
        ``"vmap"``: the same by jax.vmap over single examples (the reference).
      clip_norm: with per_example, clip each example's gradient to this global L2
        norm before averaging (DP-SGD).
      noise_multiplier: with clip_norm, add N(0, (noise_multiplier clip_norm)^2)
        to the summed gradient (Abadi et al. 2016); needs ``state.rng``.
      normalize_by: with clip_norm, divide the (noisy) clipped sum by this
        instead of the batch's size. DP-SGD with Poisson sampling passes the
        EXPECTED batch size q N (= the batch size that set q), a constant, as
        the privacy accountant assumes: dividing by the number of examples a
        step drew would make the update's scale depend on the data.
      skip_nonfinite: when the loss or a gradient is NaN/Inf, keep the old
        params and optimizer state (``metrics["finite"]`` is False; the step
        count stays, the PRNG key advances) so a bad batch never poisons the
        parameters. The caller decides whether to stop. The update runs under
        a ``lax.cond`` on a flag read from the gradient norm, so the guard
        costs a scalar test, not a select over the whole state.
      donate: donate the old state's buffers to the new one.
      mesh: data parallelism (``fbp.parallel.make_mesh``): split the batch over
        the mesh's devices, replicate the state, average the gradient across
        devices. Equals one device on the same global batch; the batch must
        divide by ``mesh.size``.
      precision: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``
        (mixed precision: float32 params and optimizer state; forward, backward
        and caches in the low dtype; loss and norms in float32), or a
        ``Policy`` (see ``get_policy``).

    Masked batches: ``step(state, x, y, mask)`` with ``mask: (batch,)`` bool
    (``fbp.data.poisson_batches`` pads each batch to one static size and marks
    the sampled rows): the examples where ``mask`` is False contribute nothing,
    bit for bit, to the gradient, the clipping norms, the loss or the counts
    (their x and y are replaced by zeros first). The loss is the mean over the
    real examples; without clipping so is the gradient; with clipping the
    gradient is the sum of the real examples' clipped gradients (plus noise)
    divided by ``normalize_by``, or by their number when it is None.

    Returns:
      A TrainStep. ``metrics`` holds ``loss``, ``grad_norm`` (of the applied
      gradient), ``finite``, with clipping ``clipped_fraction`` (of the real
      examples), and with a mask ``examples`` (how many are real).
    """
    check_is_layer(model, "make_train_step")
    check_is_loss(loss, "make_train_step")
    _check_optimizer(optimizer, "make_train_step")
    check_grad_mode(grad, "make_train_step")
    if clip_norm is not None and not per_example:
        raise ValueError("make_train_step: clip_norm clips per-example gradients; pass per_example=True too")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"make_train_step: clip_norm must be > 0, got {clip_norm!r}")
    if noise_multiplier is not None and clip_norm is None:
        raise ValueError("make_train_step: noise_multiplier needs clip_norm (noise is scaled by it)")
    is_number = isinstance(noise_multiplier, (int, float, np.number))
    if noise_multiplier is not None and not (is_number and noise_multiplier >= 0):
        raise ValueError(f"make_train_step: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if normalize_by is not None and clip_norm is None:
        raise ValueError("make_train_step: normalize_by divides the clipped sum: it needs clip_norm")
    check_normalize_by(normalize_by, "make_train_step")
    try:
        policy = get_policy(precision)
    except ValueError as error:
        raise ValueError(f"make_train_step: {error}") from None
    if clip_norm is None:
        compute = value_and_grad_with_policy(model, loss, policy, grad=grad, per_example=per_example)
    else:
        # a loss scale s scales every example's gradient: clip at s C, and the unscaled result is clipped at C
        clipped = clipped_value_and_grad(
            model,
            PolicyLoss(loss, policy) if policy.mixed else loss,
            clip_norm * policy.loss_scale,
            grad=grad,
            per_example=per_example,
            normalize_by=None if normalize_by is None else float(normalize_by),
        )

    def pure(state: TrainState, x, y, mask=None):
        takes_key = uses_key(model, state.params, x, state.rng)  # the model draws randomness (dropout)
        needs_rng = takes_key or noise_multiplier is not None
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
        count = None if mask is None else jnp.sum(jnp.asarray(mask).astype(jnp.int32))
        if clip_norm is None:
            if mask is None:
                value, grads = compute(state.params, x, y, dropout_key)
            else:
                value, grads = compute(state.params, x, y, dropout_key, mask)
        else:
            params, inputs = (
                (policy.cast_to_compute(state.params), policy.cast_to_compute(x)) if policy.mixed else (state.params, x)
            )
            if mask is None:
                value, grads, norms = clipped(params, inputs, y, dropout_key)
                metrics["clipped_fraction"] = jnp.mean(norms > clip_norm * policy.loss_scale)
            else:
                value, grads, norms = clipped(params, inputs, y, dropout_key, mask)
                clipped_count = jnp.sum(jnp.asarray(mask).astype(bool) & (norms > clip_norm * policy.loss_scale))
                metrics["clipped_fraction"] = clipped_count / jnp.maximum(count, 1)
            # the gradient in the params' dtype, unscaled, before anything adds it up
            value, grads = unscale(policy, value, policy.cast_to_param(grads))
        if noise_multiplier is not None:
            # the clipped fn divided the sum by normalize_by, else by the batch's (real) size: the noise likewise
            divisor = (
                normalize_by if normalize_by is not None else x.shape[0] if mask is None else jnp.maximum(count, 1)
            )
            grads = add_dp_noise(
                grads, noise_key, clip_norm=clip_norm, noise_multiplier=noise_multiplier, batch_size=divisor
            )
        if mask is not None:
            metrics["examples"] = count
        metrics["loss"] = value
        metrics["grad_norm"] = optax.tree.norm(grads)

        def update(state):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1, rng)

        if not skip_nonfinite:
            return update(state), metrics
        finite = jnp.isfinite(value) & grads_finite(metrics["grad_norm"], grads)
        metrics["finite"] = finite
        # the update runs only when finite; else the old state, with the key advanced
        return lax.cond(finite, update, lambda state: state.replace(rng=rng), state), metrics

    return TrainStep(pure, model, donate, mesh, policy)
