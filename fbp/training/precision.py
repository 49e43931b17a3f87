"""Mixed precision: a policy of three dtypes (params, compute, output) and a loss scale, applied to a gradient."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.grads import value_and_grad
from fbp.losses import Loss

PRECISIONS = ("float32", "bfloat16", "float16")


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
    raise ValueError(f"precision must be one of {PRECISIONS} or an fbp.training.Policy, got {precision!r}")


@dataclasses.dataclass(frozen=True)
class PolicyLoss(Loss):
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
    inner = value_and_grad(model, PolicyLoss(loss, policy), **options)

    def f(params, x, y, key=None, mask=None):
        value, grads = inner(policy.cast_to_compute(params), policy.cast_to_compute(x), y, key, mask)
        return unscale(policy, value, policy.cast_to_param(grads))

    return f


def unscale(policy: Policy, value, grads):
    if policy.loss_scale == 1:
        return value, grads
    return value / policy.loss_scale, jax.tree_util.tree_map(lambda g: g / policy.loss_scale, grads)
