"""Poisson sampling, the batches DP-SGD's accountant assumes, padded to one static size."""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.data.dataset import check_pair


class PoissonBatches(NamedTuple):
    """Batches drawn by Poisson sampling, padded to one static size.

    Attributes:
      xs: ``(steps, max_batch_size, ...)`` inputs; row ``[t, j]`` is a sampled example where
        ``mask[t, j]`` and zeros elsewhere.
      ys: ``(steps, max_batch_size, ...)`` targets, zeros where not ``mask``.
      mask: ``(steps, max_batch_size)`` bool, True for a sampled example. Its row sums are the
        batch sizes: Binomial(N, sampling_rate), different at every step. A masked-out row must
        contribute nothing to the loss, gradient, norm or count.
    """

    xs: jax.Array
    ys: jax.Array
    mask: jax.Array


def poisson_max_batch_size(
    num_examples: int, sampling_rate: float, steps: int, *, overflow_probability: float = 1e-9
) -> int:
    """The padded batch size for ``poisson_batches``: the smallest ``m`` with
    ``steps * P[Binomial(num_examples, sampling_rate) > m] <= overflow_probability``,
    so that no step of ``steps`` draws more than ``m`` examples except with that probability.

    For MNIST (60,000 examples, q = 512/60000, 4,690 steps) this is 683: the mean batch is 512
    with standard deviation 22.5, and padding to 683 costs a third more compute per step.

    Args:
      num_examples: N. sampling_rate: q in (0, 1]. steps: the draws the bound covers (the whole
        run's steps, for a bound over the run).
      overflow_probability: the allowed chance that any of the ``steps`` draws overflows.
    """
    from scipy.stats import binom  # scipy comes with jax

    where = "poisson_max_batch_size"
    _check_poisson_args(num_examples, sampling_rate, steps, where)
    if not 0.0 < overflow_probability < 1.0:
        raise ValueError(f"{where}: overflow_probability must lie in (0, 1), got {overflow_probability!r}")
    # isf: the smallest m with P[B > m] <= p (per step; the union bound over steps divides p)
    size = binom.isf(overflow_probability / steps, num_examples, sampling_rate)
    return int(min(max(size, 1), num_examples))


def poisson_batches(
    x, y, sampling_rate: float, steps: int, *, key: jax.Array, max_batch_size: int | None = None,
    overflow: str = "raise",
) -> PoissonBatches:
    """Draw ``steps`` batches by Poisson sampling: at each step every example joins independently
    with probability ``sampling_rate``, the sampling the DP-SGD accountant (``fbp.privacy``) assumes.

    Under ``jit`` shapes must be static, so each batch is padded to ``max_batch_size`` rows with
    zero rows that ``mask`` marks False. The draws are a pure function of ``key`` (per epoch:
    ``key=epoch_key(seed, epoch)``). Each (step, example) pair gets one uniform ``u``; the example
    joins when ``u < sampling_rate`` (exact to within float32's 2**-23 grid), and the batch keeps
    the sampled examples in order of ``u``, which is a uniformly random order.

    A draw larger than ``max_batch_size``:

    - ``overflow="raise"`` (the default) raises ValueError naming the step. Choose
      ``max_batch_size`` so that this has tiny probability: the default,
      ``poisson_max_batch_size(N, q, steps)``, overflows with probability at most 1e-9 over these
      ``steps``.
    - ``overflow="truncate"`` keeps a uniformly random ``max_batch_size`` of the sampled examples
      (what JAX-Privacy does) and warns. The steps are then no longer exactly Poisson sampled.

    Either way, the run differs from the exact Poisson mechanism only on the event that some step
    overflows; if that has probability at most ``p`` on every data set, an (epsilon, delta)
    guarantee for Poisson sampling becomes (epsilon, delta + (1 + e^epsilon) p) for the run (a
    coupling bound), negligible at p = 1e-9 beside delta = 1e-5. Account over the whole run: pass
    the run's total steps to ``poisson_max_batch_size`` when drawing one epoch at a time.

    Args:
      x: ``(n, ...)`` inputs. y: ``(n, ...)`` targets.
      sampling_rate: q in (0, 1], the chance each example joins a batch (expected batch size / n).
      steps: the number of batches to draw, an int >= 1.
      key: a PRNG key; the same key gives the same batches.
      max_batch_size: rows per padded batch; None: ``poisson_max_batch_size(n, q, steps)``.
      overflow: ``"raise"`` or ``"truncate"``, as above.

    Returns:
      PoissonBatches with ``xs: (steps, max_batch_size, ...)``, ``ys`` likewise, and
      ``mask: (steps, max_batch_size)`` bool.
    """
    where = "poisson_batches"
    n = check_pair(x, y, where)
    _check_poisson_args(n, sampling_rate, steps, where)
    if overflow not in ("raise", "truncate"):
        raise ValueError(f"{where}: overflow must be 'raise' or 'truncate', got {overflow!r}")
    if max_batch_size is None:
        max_batch_size = poisson_max_batch_size(n, sampling_rate, steps)
    elif not isinstance(max_batch_size, (int, np.integer)) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError(f"{where}: max_batch_size must be a positive int or None, got {max_batch_size!r}")
    max_batch_size = int(max_batch_size)
    xs, ys, mask, counts = _poisson_draw(
        jnp.asarray(x), jnp.asarray(y), key, jnp.float32(sampling_rate), int(steps), max_batch_size
    )
    counts = np.asarray(counts)
    over = np.flatnonzero(counts > max_batch_size)
    if over.size:
        first = int(over[0])
        message = (
            f"{where}: {over.size} of {steps} steps drew more than max_batch_size={max_batch_size} examples "
            f"(step {first} drew {int(counts[first])}; expected {n * sampling_rate:.1f} per step)"
        )
        if overflow == "raise":
            raise ValueError(
                f"{message}; raise max_batch_size (poisson_max_batch_size({n}, {sampling_rate}, {steps}) = "
                f"{poisson_max_batch_size(n, sampling_rate, steps)} overflows with probability 1e-9) "
                "or pass overflow='truncate'"
            )
        warnings.warn(
            f"{message}; kept a random {max_batch_size} of each; those steps are not exactly Poisson sampled",
            stacklevel=2,
        )
    return PoissonBatches(xs, ys, mask)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _poisson_draw(x, y, key, sampling_rate, steps: int, max_batch_size: int):
    """One compiled draw per data shape: per step, a uniform per example; the sampled ones
    (u < q) are the smallest u's, so top_k of -u puts them first in a uniformly random order."""
    n = x.shape[0]
    k = min(max_batch_size, n)

    def draw(step_key):
        u = jax.random.uniform(step_key, (n,))
        neg_u, index = jax.lax.top_k(-u, k)
        return index, -neg_u < sampling_rate, jnp.sum(u < sampling_rate)

    index, mask, counts = jax.lax.map(draw, jax.random.split(key, steps))  # O(n) memory per step
    if k < max_batch_size:  # more rows than examples: pad with never-sampled rows
        index = jnp.pad(index, ((0, 0), (0, max_batch_size - k)))
        mask = jnp.pad(mask, ((0, 0), (0, max_batch_size - k)))

    def gather(a):
        rows = jnp.take(a, index, axis=0)  # (steps, max_batch_size, ...)
        keep = mask.reshape(mask.shape + (1,) * (rows.ndim - 2))
        return jnp.where(keep, rows, jnp.zeros((), rows.dtype))

    return gather(x), gather(y), mask, counts


def _check_poisson_args(num_examples, sampling_rate, steps, where: str) -> None:
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"{where}: needs at least one example, got num_examples={num_examples!r}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.floating, np.integer)) or not (
        0.0 < sampling_rate <= 1.0
    ):
        raise ValueError(
            f"{where}: sampling_rate must lie in (0, 1] (expected batch size / number of examples), got {sampling_rate!r}"
        )
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
