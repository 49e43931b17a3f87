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

When any fails, every layer is checked on its own (``check_layer``: its
backward against jax.vjp with a random cotangent, on the input it really sees
in the model), then the loss (its backward against jax.grad), and the report
names the first one, in forward order, that disagrees (``locate.py``; it
descends into any layer with ``children``). If none does on the batch, the
same search runs on the first example alone.

The rooms: ``report.py`` (what comes back), ``tolerance.py`` (the tolerance
rule, its constants and ``Tolerance``), ``compare.py`` (leaf comparison),
``finite_diff.py``, ``layer.py`` (``check_layer``, ``check_loss``),
``locate.py`` (the first-wrong-layer search), ``gradients.py``
(``check_gradients``). Imports run in that order.
"""

from fbp.check.compare import compare_leaf, compare_trees
from fbp.check.finite_diff import FD_STEPS
from fbp.check.gradients import check_gradients
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
    "NOISE_FACTOR",
    "SUM_FACTOR",
    "GradientCheckError",
    "GradientReport",
    "LayerReport",
    "LeafCheck",
    "Tolerance",
    "check_gradients",
    "check_layer",
    "check_loss",
    "compare_leaf",
    "compare_trees",
    "default_rtol",
    "find_first_bad_layer",
    "precision_of",
]
