"""Gradients three ways: the hand-written backward, jax.grad, and both per example.

Everything here returns plain functions of ``(params, x, y, key=None)``; jit
them as you like (the train step does). Two choices run through every function:

- ``grad``, how a gradient is computed (``GRAD_MODES``): ``"manual"`` (the
  model's forward with its cache, the loss's backward, then ``model.backward``:
  the hand-written chain rule), ``"autodiff"`` (jax.grad of ``model.apply``,
  the reference) or ``"custom_vjp"`` (jax.grad through ``with_manual_vjp``:
  the hand-written backward as JAX's VJP).
- ``per_example`` (``PER_EXAMPLE``), whether each example's gradient is taken
  on its own (for clipping): ``False`` the batch gradient; ``True`` the fast
  path, one forward and one backward over the batch that yields what each
  example needs (the per-example hooks of ``LayerProtocol``); ``"vmap"``
  jax.vmap over single examples, materialising every example's gradient: the
  slow, obvious reference that the fast path is checked against.
"""

from fbp.grads.clip import clip_and_average, clip_factors, clipped_value_and_grad
from fbp.grads.pieces import with_manual_vjp
from fbp.grads.validate import (
    GRAD_MODES,
    MODES,
    PER_EXAMPLE,
    check_batch,
    check_grad_mode,
    check_is_layer,
    check_is_loss,
    check_mask,
    check_normalize_by,
    check_params,
)
from fbp.grads.value import per_example_grads, per_example_value_and_grad, value_and_grad

__all__ = [
    "GRAD_MODES",
    "MODES",
    "PER_EXAMPLE",
    "check_batch",
    "check_grad_mode",
    "check_is_layer",
    "check_is_loss",
    "check_mask",
    "check_normalize_by",
    "check_params",
    "clip_and_average",
    "clip_factors",
    "clipped_value_and_grad",
    "per_example_grads",
    "per_example_value_and_grad",
    "value_and_grad",
    "with_manual_vjp",
]
