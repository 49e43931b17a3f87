"""Privacy accounting for DP-SGD: the epsilon a run spends, and the noise that reaches a target.

A thin layer over Google's ``dp_accounting`` (the accountant JAX-Privacy builds on; extra
``fbp[dp]``), imported only when a function here is called::

    eps = fbp.privacy.epsilon(1.23, 512 / 60000, 4690, 1e-5)                       # RDP: ~2.58
    eps = fbp.privacy.epsilon(1.23, 512 / 60000, 4690, 1e-5, accountant="pld")     # PLD: ~2.36
    sigma = fbp.privacy.noise_multiplier_for_epsilon(3.0, 512 / 60000, 4690, 1e-5)
    delta = fbp.privacy.default_delta(60000)                                        # 1e-5

What is analysed. One DP-SGD step is the subsampled Gaussian mechanism: every example joins the
batch independently with probability ``sampling_rate`` (Poisson sampling), each example's gradient
is clipped to L2 norm ``C``, and Gaussian noise of standard deviation ``noise_multiplier * C`` is
added to the sum; ``steps`` such steps are composed. Neighbouring data sets differ by adding or
removing one example. The figures are upper bounds on epsilon for exactly that mechanism.

Fixed-size shuffled batches (``fbp.data.batches``: a permutation cut into equal batches) are
*not* the mechanism analysed here: the epsilon below is what such runs commonly report, but it
is not a proven guarantee for them. Draw batches with ``fbp.data.poisson_batches`` for the
guarantee to hold. See docs/privacy.md.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

ACCOUNTANTS = ("rdp", "pld")

# dp_accounting's default grid for the privacy loss distribution. The PLD epsilon on a grid is a
# pessimistic (upper) bound; in the published MNIST setting this spacing gives 2.36411, a 10x
# finer grid 2.36408 (20x slower) and a 10x coarser one 2.36704 (8x faster). See docs/privacy.md.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

_INSTALL = 'privacy accounting needs Google\'s dp_accounting package; install the extra: pip install "fbp[dp]"'


def epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *, accountant: str = "rdp"
) -> float:
    """The epsilon spent by ``steps`` DP-SGD steps with Poisson sampling, at ``delta``.

    Assumes Poisson sampling (each example joins each batch independently with probability
    ``sampling_rate``) and add-or-remove-one neighbours; fixed-size shuffled batches are not
    covered by this analysis (see the module docstring).

    Args:
      noise_multiplier: sigma, the noise standard deviation divided by the clip norm; > 0.
      sampling_rate: q, the probability that an example joins a batch (batch size / N); in (0, 1].
      steps: the number of noisy steps taken; an int >= 0 (0 spends nothing: epsilon 0).
      delta: the target delta, in (0, 1); see ``default_delta``.
      accountant: ``"rdp"`` (Renyi DP, Mironov 2017 and Mironov et al. 2019, read with the
        tighter RDP-to-(epsilon, delta) conversion of Canonne et al. 2020, Prop. 12; a few tens of
        milliseconds) or ``"pld"`` (privacy loss distributions on a grid, Koskela et al. 2020,
        Doroshenko et al. 2022; tighter, about 0.5 s for the MNIST setting).

    Returns:
      epsilon, a float >= 0 (``inf`` when the noise is too small for any finite bound).

    Raises:
      ValueError: an argument out of range (the message names it).
      ImportError: ``dp_accounting`` is not installed (``pip install "fbp[dp]"``).
    """
    _check_noise(noise_multiplier, "epsilon")
    _check_common(sampling_rate, steps, delta, accountant, "epsilon")
    if steps == 0:
        return 0.0
    dp = _import_dp_accounting()
    event = _dp_sgd_event(dp, float(noise_multiplier), float(sampling_rate), int(steps))
    try:
        return float(_make_accountant(dp, accountant).compose(event).get_epsilon(float(delta)))
    except MemoryError as error:  # the PLD grid grows like 1 / (sigma * interval)
        raise MemoryError(
            f"epsilon: the PLD accountant ran out of memory for noise_multiplier={noise_multiplier}; "
            "noise this small spends an enormous epsilon; use accountant='rdp' for such settings"
        ) from error


def noise_multiplier_for_epsilon(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, *, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to within 1e-6) whose ``steps`` steps spend at most
    ``target_epsilon`` at ``delta``: the inverse of ``epsilon``.

    Calibrated with ``dp_accounting.calibrate_dp_mechanism`` (Brent's method), which guarantees
    ``epsilon(result, ...) <= target_epsilon``: the returned noise never spends more than asked.
    Same sampling assumption as ``epsilon``: Poisson sampling, add-or-remove-one neighbours.

    Args:
      target_epsilon: the budget for the whole run; > 0.
      sampling_rate: q = batch size / N; in (0, 1].
      steps: the number of noisy steps the run will take; an int >= 1.
      delta: in (0, 1).
      accountant: ``"rdp"`` or ``"pld"``, as in ``epsilon``. PLD calibration evaluates the PLD
        accountant about ten times (seconds for an MNIST-sized run), bracketed by the RDP answer.

    Returns:
      sigma, a float > 0.

    Raises:
      ValueError: an argument out of range (the message names it).
      ImportError: ``dp_accounting`` is not installed (``pip install "fbp[dp]"``).
    """
    where = "noise_multiplier_for_epsilon"
    if not _is_real(target_epsilon) or not 0.0 < target_epsilon < math.inf:
        raise ValueError(f"{where}: target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_common(sampling_rate, steps, delta, accountant, where)
    if steps == 0:
        raise ValueError(
            f"{where}: steps=0 spends no privacy, so every noise multiplier meets any target; "
            "pass the number of steps the run will take (>= 1)"
        )
    dp = _import_dp_accounting()
    q, steps, delta, target = float(sampling_rate), int(steps), float(delta), float(target_epsilon)

    def event(sigma: float):
        return _dp_sgd_event(dp, sigma, q, steps)

    def calibrate(name: str, bracket):
        return float(dp.calibrate_dp_mechanism(lambda: _make_accountant(dp, name), event, target, delta, bracket))

    # RDP bounds the true epsilon from above, so its sigma is (nearly) an upper end for PLD's;
    # starting from it keeps the costly PLD evaluations few and away from tiny sigmas, whose PLD
    # grid would not fit in memory.
    sigma_rdp = calibrate("rdp", dp.LowerEndpointAndGuess(0.0, 1.0))
    if accountant == "rdp":
        return sigma_rdp
    # PLD's sigma was 0.92-0.96x RDP's in the nine settings measured (docs/privacy.md)
    try:
        return calibrate("pld", dp.ExplicitBracketInterval(0.7 * sigma_rdp, 1.05 * sigma_rdp))
    except ValueError:  # that interval does not bracket the target: dp_accounting's own search
        return calibrate("pld", dp.LowerEndpointAndGuess(0.0, 1.05 * sigma_rdp))


def default_delta(num_examples: int) -> float:
    """1 / ``num_examples`` rounded down to a power of ten: 1797 -> 1e-4, 60000 -> 1e-5.

    The usual rule asks for delta at most 1/N (a mechanism that publishes one random example
    outright is (0, 1/N)-DP); the power of ten makes the figure easy to state. Pass a smaller
    delta for a stronger claim.

    Raises:
      ValueError: ``num_examples`` is not an int >= 2 (for N = 1 the rule gives delta = 1).
    """
    if not _is_int(num_examples) or num_examples < 2:
        raise ValueError(f"default_delta: num_examples must be an int >= 2, got {num_examples!r}")
    exponent = len(str(int(num_examples) - 1))  # the smallest k with 10**k >= N, exact in integers
    return 10.0**-exponent


# --- helpers ----------------------------------------------------------------------------------


def _import_dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    return dp_accounting


def _dp_sgd_event(dp, noise_multiplier: float, sampling_rate: float, steps: int):
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    step = dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier))
    return dp.SelfComposedDpEvent(step, steps)


def _make_accountant(dp, name: str):
    if name == "rdp":
        return dp.rdp.RdpAccountant()
    return dp.pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_noise(noise_multiplier, where: str) -> None:
    if not _is_real(noise_multiplier) or not 0.0 < noise_multiplier < math.inf:
        raise ValueError(
            f"{where}: noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; "
            "without noise nothing is private (epsilon is infinite)"
        )


def _check_common(sampling_rate, steps, delta, accountant, where: str) -> None:
    if not _is_real(sampling_rate) or not 0.0 < sampling_rate <= 1.0:
        raise ValueError(
            f"{where}: sampling_rate must lie in (0, 1] (batch size / number of examples), got {sampling_rate!r}"
        )
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"{where}: steps must be an int >= 0, got {steps!r}")
    if not _is_real(delta) or not 0.0 < delta < 1.0:
        raise ValueError(
            f"{where}: delta must lie in (0, 1), got {delta!r}; default_delta(N) gives 1/N rounded down to a power of 10"
        )
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"{where}: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
