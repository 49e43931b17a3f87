"""How close is close enough: the tolerance rule, its constants, and the measured rounding noise.

Tolerance rule (docs/checker.md has the measurements behind it). For a leaf with
reference r and candidate c, element i passes when

    |c_i - r_i| <= atol + rtol (|r_i| + rms(r)) + NOISE_FACTOR (max(noise) + eps G) + sum_i

* ``rtol`` covers rounding in well-conditioned sums; it defaults by the lowest
  float precision among params and x (``DEFAULT_RTOL``: float64 1e-9, float32
  1e-4, float16 1e-2, bfloat16 3e-2). The rms term is the scale of the rounding
  of a sum: an element that nearly cancels carries the rounding of the terms
  summed into it, not of its own small value. Size enters through rms(r) and
  the terms below, which grow with the leaf and with the sums behind it.
* ``noise`` is the measured rounding of this very gradient, for ill-conditioned
  ones (mostly cancellation: LayerNorm over few features): |jax.grad in the
  dtype - jax.grad in float64|, elementwise. For float64 there is nothing
  higher, so it is the float32 noise times eps(float64) / eps(float32). Below
  float32 the manual backward's own rounding counts too (see
  ``Tolerance.math_only``). It is computed only when a row fails without it,
  since it can only widen.
* ``eps G``: eps of the dtype times G, the largest gradient element in the
  model (or layer): in this precision anything below is zero
  (``Tolerance.zero_floor``).
* ``sum_i = SUM_FACTOR max(1, log2 B) eps mean_j |g_j,i|`` is the rounding of a
  pairwise sum over a batch of B examples with per-example gradients g_j (XLA
  sums low precisions in float32, so this is generous there): a gradient that
  is exactly 0 by symmetry (balanced labels) is such a cancelling sum, and
  jax's own noise there is often exactly 0 too (``Tolerance.sum_floor``).

For a finite-difference direction v (unit norm) on a leaf with manual gradient g:

    |fd - <g, v>| <= fd_atol + max(rtol, FD_RTOL) ||g|| + NOISE_FACTOR (||noise|| + eps G sqrt(size)) + ||sum||,

since |<e, v>| <= ||e||. The float64 central difference with step
h = 1e-6 max(1, ||leaf||) has truncation error ~h^2 and rounding error
~eps64 |L| / h, so ``fd_atol = 16 eps64 (1 + |L|) / h`` and ``FD_RTOL = 1e-7``.
Each direction is also differenced with steps h/10 and h/100 and the closest
estimate counts (``fbp.check.finite_diff.FD_STEPS``): a ReLU or max-pool kink
within a step of the point spoils the longer steps only, while a wrong gradient
disagrees with all three.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.compare import as_float64, by_path, is_float

DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
NOISE_FACTOR = 4.0  # how much noisier than measured a correct gradient may be
FD_RTOL = 1e-7  # float64 central differences: truncation + rounding, relative to ||g||
SUM_FACTOR = 4.0  # times the rounding of a pairwise batch sum, log2(B) eps mean_j |g_j|
PROBE = "float32"  # the lower precision whose noise, scaled, stands in for float64's


def precision_of(*trees) -> str:
    """The lowest float precision (largest epsilon) among the trees' leaves, as a dtype name."""
    dtypes = [jnp.result_type(leaf) for tree in trees for leaf in jax.tree_util.tree_leaves(tree) if is_float(leaf)]
    if not dtypes:
        return "float32"
    return str(max(dtypes, key=lambda d: float(jnp.finfo(d).eps)))


def default_rtol(dtype: str) -> float:
    """``DEFAULT_RTOL[dtype]``; for a float type not listed, 64 machine epsilons."""
    return DEFAULT_RTOL.get(dtype, 64 * float(jnp.finfo(dtype).eps))


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The settings of the rule above, and the terms that follow from them in one precision.

    Attributes:
      rtol: the relative tolerance; None chooses ``default_rtol`` of the precision checked.
      atol: an absolute allowance added to every element's.
      noise_factor: how much noisier than measured a correct gradient may be;
        0 turns the noise and zero-floor terms off.
      dtype: the precision checked (``for_dtype`` sets it, with rtol); None as given by a caller.
    """

    rtol: float | None = None
    atol: float = 0.0
    noise_factor: float = NOISE_FACTOR
    dtype: str | None = None

    def for_dtype(self, dtype: str) -> Tolerance:
        """These settings for a check in ``dtype``: rtol filled in by dtype unless given."""
        return dataclasses.replace(self, rtol=default_rtol(dtype) if self.rtol is None else self.rtol, dtype=dtype)

    def as_arguments(self) -> dict[str, float | None]:
        """The settings as keyword arguments of ``check_layer``, ``check_loss``, ``find_first_bad_layer``."""
        return {"rtol": self.rtol, "atol": self.atol, "noise_factor": self.noise_factor}

    @property
    def eps(self) -> float:
        return float(jnp.finfo(self.dtype).eps)

    @property
    def measures_noise(self) -> bool:
        """Whether a failing row earns a second look with the measured rounding noise."""
        return self.noise_factor > 0

    @property
    def noise_precision(self) -> str:
        """Where the rounding noise is measured: float64, or for float64 itself the probe (float32)."""
        return "float64" if self.dtype != "float64" else PROBE

    @property
    def math_only(self) -> bool:
        """Below float32 (bfloat16, float16) the manual backward's own rounding counts as noise too.

        There a correct backward can be far noisier than jax.grad's (LayerNorm over 2
        features: cancellation that jax's formula happens to do exactly), and no
        tolerance both admits that and still detects anything: so in these dtypes
        the checker verifies the backward's mathematics, measuring its rounding as
        |manual in dtype - the same manual code in float64|. A logic bug is wrong in
        float64 too and still shows; a bug that exists only in low precision does not.
        """
        return self.eps > float(jnp.finfo(np.float32).eps)

    def zero_floor(self, *trees) -> float:
        """NOISE_FACTOR eps G, G the largest gradient element anywhere: in this precision, anything below is 0.

        A leaf whose exact gradient is 0 or nearly (LayerNorm over 1 or 2 features
        stops almost all of it) gets only the rounding of the terms that cancelled,
        whose scale is the gradients around it, not its own.
        """
        largest = max(
            (float(np.max(np.abs(as_float64(a)), initial=0.0)) for t in trees for a in jax.tree_util.tree_leaves(t)),
            default=0.0,
        )
        return self.noise_factor * self.eps * largest

    def sum_floor(self, gross, batch: int) -> dict[str, np.ndarray]:
        """By path, SUM_FACTOR max(1, log2 B) eps mean_j |g_j|: the rounding of a pairwise sum over the batch.

        ``gross`` holds mean_j |g_j| for the per-example gradients g_j, shaped like params.
        """
        depth = max(1.0, float(np.log2(batch)))
        return {p: SUM_FACTOR * depth * self.eps * as_float64(g) for p, g in by_path(gross).items()}

    def noise(self, native: dict[str, Any], other: dict[str, Any]) -> dict[str, np.ndarray]:
        """Elementwise rounding noise of gradients computed in ``self.dtype``, by path.

        ``native`` and ``other`` map a path to a leaf (``compare.by_path``);
        ``other`` holds the same gradients computed in ``noise_precision``:
        float64, or for float64 the probe, whose noise is scaled down by the
        ratio of the machine epsilons. Leaves missing or misshapen on either
        side get no entry.
        """
        scale = float(jnp.finfo(np.float64).eps / jnp.finfo(PROBE).eps) if self.dtype == "float64" else 1.0
        return {
            p: scale * np.abs(as_float64(r) - as_float64(other[p]))
            for p, r in native.items()
            if p in other and np.shape(r) == np.shape(other[p])
        }

    def allowance(self, noise: dict[str, np.ndarray]) -> dict[str, float]:
        """By path, the absolute allowance NOISE_FACTOR max(noise) for the measured noise of each leaf."""
        return {p: self.noise_factor * float(np.max(n, initial=0.0)) for p, n in noise.items()}


def larger(a: dict, b: dict) -> dict:
    """Elementwise max of two noise dicts (by path)."""
    return {p: np.maximum(n, b[p]) if p in b and np.shape(b[p]) == np.shape(n) else n for p, n in a.items()}
