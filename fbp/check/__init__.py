"""The gradient checker: is the hand-written backward right, leaf by leaf?

Three independent witnesses (``check_gradients``, in ``gradients.py``):

1. ``autodiff``: the manual gradient against jax.grad of the same forward,
   element by element, in the same precision.
2. ``finite-diff``: directional derivatives of the loss by central finite
   differences in float64 (params and inputs cast up), against
   <manual gradient, direction>, along the manual gradient itself and along
   random directions. Independent of jax.grad (``finite_diff.py``).
3. ``per-example``: the average of per-example manual gradients (jax.vmap over
   single examples) against the batch manual gradient. Catches a backward that
   is right for one example and wrong for a batch.

Then a fourth, for the fast paths a train step takes: every layer's
per-example hooks (``per_example_sq_norms``, ``per_example_weighted_grads``,
``per_example_backward``: clipping at the cost of a batch gradient) against
jax.vmap of that layer's own backward over single examples, at the input it
sees in the model (``hooks.py``), naming the first wrong layer and hook.
Every witness takes the model's PRNG key (``key=``), so Dropout is checked
with a mask, the same mask in every precision.

When any of the first three fails, every layer is checked on its own (``check_layer``: its
backward against jax.vjp with a random cotangent, on the input it really sees
in the model), then the loss (its backward against jax.grad), and the report
names the first one, in forward order, that disagrees (``locate.py``; it
descends into any layer with ``children``). If none does on the batch, the
same search runs on the first example alone.

The rooms: ``report.py`` (what comes back), ``tolerance.py`` (the tolerance
rule, its constants and ``Tolerance``), ``compare.py`` (leaf comparison),
``finite_diff.py``, ``layer.py`` (``check_layer``, ``check_loss``),
``locate.py`` (the first-wrong-layer search), ``hooks.py`` (the hook witness,
``check_hooks``), ``gradients.py`` (``check_gradients``). Imports run in that order.
"""

from fbp.check.compare import compare_leaf, compare_trees
from fbp.check.finite_diff import FD_STEPS
from fbp.check.gradients import check_gradients
from fbp.check.hooks import HOOKS, HookCheck, check_hooks
from fbp.check.layer import check_layer, check_loss
from fbp.check.locate import find_first_bad_layer
from fbp.check.report import GradientCheckError, GradientReport, LayerReport, LeafCheck
from fbp.check.tolerance import (
    DEFAULT_RTOL,
    FD_RTOL,
    NOISE_FACTOR,
    SUM_FACTOR,
    Tolerance,
    default_rtol,
    precision_of,
)

__all__ = [
    "DEFAULT_RTOL",
    "FD_RTOL",
    "FD_STEPS",
    "HOOKS",
    "NOISE_FACTOR",
    "SUM_FACTOR",
    "GradientCheckError",
    "GradientReport",
    "HookCheck",
    "LayerReport",
    "LeafCheck",
    "Tolerance",
    "check_gradients",
    "check_hooks",
    "check_layer",
    "check_loss",
    "compare_leaf",
    "compare_trees",
    "default_rtol",
    "find_first_bad_layer",
    "precision_of",
]
