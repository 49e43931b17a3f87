"""Training: a pytree TrainState, a jitted train step, an epoch of steps, evaluation, a precision policy.

    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, loss, optimizer, grad="manual")    # precision="bfloat16" for mixed
    state, metrics = step(state, x, y)          # jitted once per input shape
    state, history = fbp.train_epoch(step, state, xs, ys)   # xs: (num_batches, batch, ...)
    state, metrics = step(state, x, y, mask)    # a padded batch: only the examples where mask count

``train_epoch`` runs the epoch as one compiled ``lax.scan`` or as a Python loop
of the jitted step (asynchronous dispatch), whichever is faster for the model
and backend (``epoch_strategy``); its results are bit-identical to calling the
step on each batch in turn.
"""

from __future__ import annotations

import dataclasses
import functools
import time
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
    MODES,
    check_batch,
    check_is_layer,
    check_is_loss,
    check_mask,
    clipped_value_and_grad,
    value_and_grad,
)
from fbp.grads import clip_and_average as clip_and_average  # noqa: PLC0414 - explicit re-export: it lived here before
from fbp.layers.base import describe, uses_key
from fbp.losses import MSE, Loss, SoftmaxCrossEntropy

PRECISIONS = ("float32", "bfloat16", "float16")
EPOCH_STRATEGIES = ("auto", "scan", "loop")


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


@dataclasses.dataclass(frozen=True)
class Policy:
    """A mixed-precision policy, in the three dtypes of DeepMind's jmp (``jmp.Policy``), plus a loss scale.

    The train step keeps ``params`` and the optimizer state in ``param_dtype``;
    casts them and the floating inputs to ``compute_dtype`` for the forward
    pass, the caches and the hand-written backward; computes the loss on the
    model's output cast to ``output_dtype``, and casts the gradient back to
    ``param_dtype`` before the gradient norm, clipping's noise, the non-finite
    guard and the optimizer. Integer inputs (labels, token ids) are not cast.

    Attributes:
      param_dtype: parameters and optimizer state (``"float32"``).
      compute_dtype: forward, backward and caches (``"float32"``, ``"bfloat16"`` or ``"float16"``).
      output_dtype: the model output as the loss sees it, so the loss, its
        gradient and the norms add up in this dtype (``"float32"``).
      loss_scale: dL/dpred is multiplied by this before the backward and the
        gradient divided by it after (a static loss scale, for float16's
        narrow range: small gradients would flush to zero). An overflow makes
        the gradient non-finite, and the step's non-finite guard skips it.
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"
    loss_scale: float = 1.0

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, field)
            try:
                dtype = jnp.dtype(value)
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"Policy: {field} must be a floating dtype such as 'float32', got {value!r}")
            object.__setattr__(self, field, dtype.name)
        if not (isinstance(self.loss_scale, (int, float)) and np.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise ValueError(f"Policy: loss_scale must be a positive number, got {self.loss_scale!r}")

    @property
    def mixed(self) -> bool:
        """Whether the step casts anything (False for the all-float32 policy)."""
        return len({self.param_dtype, self.compute_dtype, self.output_dtype}) > 1 or self.loss_scale != 1

    def cast_to_compute(self, tree):
        """Every floating leaf of ``tree`` in ``compute_dtype``; other leaves as they are."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_param(self, tree):
        """Every floating leaf of ``tree`` in ``param_dtype``."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_output(self, tree):
        """Every floating leaf of ``tree`` in ``output_dtype``."""
        return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree, dtype):
    def cast(leaf):
        return leaf.astype(dtype) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


def get_policy(precision: str | Policy) -> Policy:
    """The policy that ``precision`` names.

    Args:
      precision: ``"float32"`` (everything float32, no casts), ``"bfloat16"``
        (float32 params and optimizer state; forward, backward and caches in
        bfloat16; loss and norms in float32), ``"float16"`` (the same with
        float16 and a static loss scale of 2**10), or a ``Policy``.
    """
    if isinstance(precision, Policy):
        return precision
    if precision == "float32":
        return Policy()
    if precision == "bfloat16":
        return Policy(compute_dtype="bfloat16")
    if precision == "float16":
        return Policy(compute_dtype="float16", loss_scale=2.0**10)
    raise ValueError(f"precision must be one of {PRECISIONS} or an fbp.training.step.Policy, got {precision!r}")


@dataclasses.dataclass(frozen=True)
class _PolicyLoss(Loss):
    """``loss`` on the model output cast to the policy's output dtype; dL/dpred back in the compute dtype.

    The loss value (a mean over the batch) and its gradient are computed in
    ``output_dtype`` (float32): in bfloat16, log-softmax and the batch mean lose
    digits that a bfloat16 backward does not need to lose. Value and gradient
    are multiplied by ``loss_scale`` (the value too, so that jax.grad of it in
    the autodiff modes scales alike); the step divides both back in float32.
    """

    loss: Any
    policy: Policy

    def forward(self, pred, target):
        value, cache = self.loss.forward(pred.astype(self.policy.output_dtype), target)
        return (value * self.policy.loss_scale if self.policy.loss_scale != 1 else value), cache

    def backward(self, cache):
        dpred = self.loss.backward(cache)
        if self.policy.loss_scale != 1:
            dpred = dpred * self.policy.loss_scale
        return dpred.astype(self.policy.compute_dtype)


def value_and_grad_with_policy(model, loss, policy: Policy, **options) -> Callable:
    """``fbp.value_and_grad(model, loss, **options)`` under ``policy``: ``f(params, x, y, key=None, mask=None)``.

    Params and floating inputs are cast to the compute dtype, the loss is taken
    in the output dtype, and the gradient comes back in the params' dtype with
    the loss scale divided out: the gradient the train step applies.
    """
    if not policy.mixed:
        return value_and_grad(model, loss, **options)
    inner = value_and_grad(model, _PolicyLoss(loss, policy), **options)

    def f(params, x, y, key=None, mask=None):
        value, grads = inner(policy.cast_to_compute(params), policy.cast_to_compute(x), y, key, mask)
        return _unscale(policy, value, policy.cast_to_param(grads))

    return f


def _unscale(policy: Policy, value, grads):
    if policy.loss_scale == 1:
        return value, grads
    return value / policy.loss_scale, jax.tree_util.tree_map(lambda g: g / policy.loss_scale, grads)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _grads_finite(grad_norm: jax.Array, grads) -> jax.Array:
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
    """

    pure: Callable
    model: Any
    donate: bool = True
    mesh: Mesh | None = None
    policy: Policy = Policy()

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
        object.__setattr__(self, "_strategies", {})  # epoch signature -> "scan" or "loop"

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


@jax.jit
def _unstack(*stacks):
    """Every batch of a stack as its own array, in one dispatch: the loop then calls the very program that
    ``step(state, x, y)`` runs, so its results are bit-identical to calling the step by hand."""
    return tuple(list(stack) for stack in stacks)


@jax.jit
def _stack_metrics(metrics: list[dict]) -> dict:
    return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *metrics)


_copy_tree = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


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
    if grad not in MODES:
        raise ValueError(f"make_train_step: grad must be one of {MODES}, got {grad!r}")
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
    is_number = isinstance(normalize_by, (int, float, np.number)) and not isinstance(normalize_by, bool)
    if normalize_by is not None and not (is_number and normalize_by > 0):
        raise ValueError(
            f"make_train_step: normalize_by must be a number > 0 (the expected batch size q N), got {normalize_by!r}"
        )
    try:
        policy = get_policy(precision)
    except ValueError as error:
        raise ValueError(f"make_train_step: {error}") from None
    if clip_norm is None:
        compute = value_and_grad_with_policy(model, loss, policy, grad=grad, per_example=per_example)
    else:
        # a loss scale s scales every example's gradient: clip at s C, and the unscaled result is clipped at C
        clipped = clipped_value_and_grad(
            model, _PolicyLoss(loss, policy) if policy.mixed else loss, clip_norm * policy.loss_scale, grad=grad,
            per_example=per_example, normalize_by=None if normalize_by is None else float(normalize_by),
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
            params, inputs = (policy.cast_to_compute(state.params), policy.cast_to_compute(x)) if policy.mixed \
                else (state.params, x)
            if mask is None:
                value, grads, norms = clipped(params, inputs, y, dropout_key)
                metrics["clipped_fraction"] = jnp.mean(norms > clip_norm * policy.loss_scale)
            else:
                value, grads, norms = clipped(params, inputs, y, dropout_key, mask)
                clipped_count = jnp.sum(jnp.asarray(mask).astype(bool) & (norms > clip_norm * policy.loss_scale))
                metrics["clipped_fraction"] = clipped_count / jnp.maximum(count, 1)
            # the gradient in the params' dtype, unscaled, before anything adds it up
            value, grads = _unscale(policy, value, policy.cast_to_param(grads))
        if noise_multiplier is not None:
            # the clipped fn divided the sum by normalize_by, else by the batch's (real) size: the noise likewise
            divisor = normalize_by if normalize_by is not None else x.shape[0] if mask is None else jnp.maximum(count, 1)
            grads = add_dp_noise(grads, noise_key, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                 batch_size=divisor)
        if mask is not None:
            metrics["examples"] = count
        metrics["loss"] = value
        metrics["grad_norm"] = optax.tree.norm(grads)

        def update(state):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1, rng)

        if not skip_nonfinite:
            return update(state), metrics
        finite = jnp.isfinite(value) & _grads_finite(metrics["grad_norm"], grads)
        metrics["finite"] = finite
        # the update runs only when finite; else the old state, with the key advanced
        return lax.cond(finite, update, lambda state: state.replace(rng=rng), state), metrics

    return TrainStep(pure, model, donate, mesh, policy)


def epoch_strategy(step: TrainStep, state: TrainState, xs, ys) -> str:
    """How ``train_epoch(step, state, xs, ys)`` runs by default: ``"scan"`` or ``"loop"``, decided once per
    input signature and kept on the step.

    On CPU a rule decides, from measurements (benchmarks/RESULTS.md): a model
    with a convolution runs as a loop of jitted steps, since XLA:CPU runs
    convolution gradients inside a while loop several times slower than at the
    top level (jax-ml/jax#12868: the 28x28 CNN at batch 128 took 24x the loop's
    time per step, the 8x8 digits CNN 3.5x); any other model runs as one scan,
    which saves the per-step dispatch (0.6x the loop's time on the 64-128-128-10
    MLP at batch 32). On other backends (where a while loop may sync with the
    host every iteration, jax-ml/jax#2491) both run once on a copy of the state
    after compiling, and the faster is kept.
    """
    key = _epoch_signature(state, xs, ys)
    if key not in step._strategies:
        if _platform(step) == "cpu":
            chosen = "loop" if _has_convolution(step, state, xs, ys) else "scan"
        else:
            chosen = _measure_strategies(step, state, xs, ys)
        step._strategies[key] = chosen
    return step._strategies[key]


def _epoch_signature(state, xs, ys):
    leaves, treedef = jax.tree_util.tree_flatten((state, xs, ys))
    return treedef, tuple((getattr(leaf, "shape", None), getattr(leaf, "dtype", type(leaf))) for leaf in leaves)


def _has_convolution(step: TrainStep, state: TrainState, xs, ys) -> bool:
    """Whether the model's forward pass holds a convolution (read from a trace of ``apply`` on shapes alone)."""
    abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    params = jax.tree_util.tree_map(abstract, state.params)
    x = jax.ShapeDtypeStruct(jnp.shape(xs)[1:], jnp.result_type(xs))
    jaxpr = jax.make_jaxpr(lambda p, x: step.model.apply(p, x))(params, x).jaxpr
    return _holds_primitive(jaxpr, "conv_general_dilated")


def _holds_primitive(jaxpr, name: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns") and _holds_primitive(inner, name):
                    return True
    return False


def _measure_strategies(step: TrainStep, state: TrainState, xs, ys) -> str:
    """Time one epoch of each strategy on copies of ``state`` (after a first, compiling run); the faster."""
    times = {}
    for strategy in ("loop", "scan"):
        for _ in range(2):  # the first run compiles
            start = time.perf_counter()
            jax.block_until_ready(_epoch_by(step, strategy, _copy_tree(state), xs, ys))
            times[strategy] = time.perf_counter() - start
    return min(times, key=times.get)


def _platform(step: TrainStep) -> str:
    return next(iter(step.mesh.devices.flat if step.mesh is not None else jax.devices())).platform


def _epoch_by(step: TrainStep, strategy: str, state: TrainState, xs, ys, masks=None):
    if strategy == "scan":
        return step._epoch(state, xs, ys) if masks is None else step._epoch_masked(state, xs, ys, masks)
    # On one CPU device the batches are numpy views of the stack and the metrics are stacked on the host: the
    # step's own program runs on them as on device arrays, and nothing else compiles (a slicing or stacking
    # program costs about as much to compile as a short epoch of a small model costs to run).
    host = step.mesh is None and _platform(step) == "cpu"
    if masks is None:
        batches = zip(np.asarray(xs), np.asarray(ys)) if host else zip(*_unstack(xs, ys))
    else:
        batches = zip(np.asarray(xs), np.asarray(ys), np.asarray(masks)) if host else zip(*_unstack(xs, ys, masks))
    jitted = step._jitted if masks is None else step._jitted_masked
    # one step in flight on forced CPU devices with all-reduces, as parallel.place does for a step
    wait = step.mesh is not None and step.mesh.size > 1 and _platform(step) == "cpu"
    metrics = []
    for batch in batches:
        state, step_metrics = jitted(state, *batch)
        metrics.append(step_metrics)
        if wait:
            jax.block_until_ready(state)
    if host:
        stacked = jax.tree_util.tree_map(lambda *values: np.stack(values), *jax.device_get(metrics))
        return state, jax.tree_util.tree_map(jnp.asarray, stacked)
    return state, _stack_metrics(metrics)


def train_epoch(step: TrainStep, state: TrainState, xs, ys, *, masks=None, strategy: str = "auto"):
    """Run a whole epoch of batches: every step compiled once, the metrics stacked.

    Args:
      step: from ``make_train_step``.
      state: the TrainState.
      xs: ``(num_batches, batch, ...)`` device-resident inputs.
      ys: ``(num_batches, batch, ...)`` targets.
      masks: ``(num_batches, batch)`` bool, True for the real examples of padded
        batches (``fbp.data.poisson_batches``), or None (every example is real).
      strategy: ``"scan"`` (one compiled ``lax.scan`` over the batches),
        ``"loop"`` (a Python loop of the jitted step, dispatched
        asynchronously: no host sync until the metrics are read), or
        ``"auto"`` (default): the one ``epoch_strategy`` picks for this model
        and backend. The loop runs the very program ``step(state, x, y)`` runs,
        so its results are bit-identical to calling ``step`` on each batch in
        turn; so are the scan's wherever XLA compiles the step alike inside a
        while loop (tested for MLPs on CPU; not XLA:CPU's convolution
        gradients, which "auto" runs as a loop).

    Returns:
      (state, metrics) with every metric stacked over batches: ``(num_batches,)``.
    """
    if not isinstance(step, TrainStep):
        raise TypeError(f"train_epoch: expected the TrainStep from make_train_step, got {type(step).__name__}")
    if strategy not in EPOCH_STRATEGIES:
        raise ValueError(f"train_epoch: strategy must be one of {EPOCH_STRATEGIES}, got {strategy!r}")
    xs_shape, ys_shape = jnp.shape(xs), jnp.shape(ys)
    if len(xs_shape) < 2 or len(ys_shape) < 2 or xs_shape[:2] != ys_shape[:2]:
        raise ValueError(
            f"train_epoch: expected xs (num_batches, batch, ...) and ys with the same two leading axes, "
            f"got {xs_shape} and {ys_shape}"
        )
    if xs_shape[0] == 0:
        raise ValueError(f"train_epoch: no batches (xs has shape {xs_shape})")
    if masks is not None and tuple(jnp.shape(masks)) != tuple(xs_shape[:2]):
        raise ValueError(
            f"train_epoch: masks must have shape (num_batches, batch) = {tuple(xs_shape[:2])}, "
            f"got {tuple(jnp.shape(masks))}"
        )
    if step.mesh is not None:
        state, xs, ys = parallel.place(step.mesh, state, xs, ys, batch_axis=1)
        masks = None if masks is None else parallel.shard_batch(step.mesh, masks, 1)
    if strategy == "auto":
        strategy = epoch_strategy(step, state, xs, ys)
    return _epoch_by(step, strategy, state, xs, ys, masks)


def _default_loss(y):
    return SoftmaxCrossEntropy() if jnp.issubdtype(jnp.result_type(y), jnp.integer) else MSE()


def _hits(pred, y):
    """Elementwise correct predictions: one per label (per example, or per step of a sequence)."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        if pred.shape == y.shape:  # one logit per binary target
            return (pred > 0) == (y > 0)
        return jnp.argmax(pred, -1) == y
    if pred.shape[-1] > 1:  # one-hot / probabilities
        return jnp.argmax(pred, -1) == jnp.argmax(y, -1)
    return (pred > 0) == (y > 0.5)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(model, loss, params, x, y):
    """(loss summed over examples, correct labels, labels) of one batch; compiled once per model, loss, shape."""
    pred = model.apply(params, x)
    hits = _hits(pred, y)
    return loss(pred, y) * x.shape[0], jnp.sum(hits), hits.size


def evaluate(model, params, x, y, *, loss=None, metrics=("loss", "accuracy"), batch_size: int = 1024) -> dict:
    """Mean loss and accuracy over a data set, in jitted batches.

    Args:
      model: the layer.
      params: its parameters.
      x: ``(n, ...)`` inputs. y: ``(n, ...)`` targets.
      loss: defaults to SoftmaxCrossEntropy for integer labels, else MSE.
      metrics: any of ``"loss"``, ``"accuracy"`` (argmax vs label; sign for one logit; with a label
        per sequence step, the fraction of steps right).
      batch_size: examples per compiled batch (the tail runs as one smaller batch).

    Returns:
      {name: float}.
    """
    check_batch(model, x, y)
    unknown = set(metrics) - {"loss", "accuracy"}
    if unknown:
        raise ValueError(f"evaluate: unknown metrics {sorted(unknown)}; choose from ['accuracy', 'loss']")
    loss = _default_loss(y) if loss is None else loss
    n = jnp.shape(x)[0]
    total_loss, correct, labels = 0.0, 0, 0
    for start in range(0, n, batch_size):
        batch_loss, batch_correct, batch_labels = _eval_sums(
            model, loss, params, x[start : start + batch_size], y[start : start + batch_size]
        )
        total_loss += float(batch_loss)
        correct += int(batch_correct)
        labels += int(batch_labels)
    out = {"loss": total_loss / n, "accuracy": correct / max(labels, 1)}
    return {name: out[name] for name in metrics}
