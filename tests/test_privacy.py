"""fbp.privacy against a published setting, its inverse, its defaults and its input checks.

The published setting: Tramer & Boneh 2021 ("Differentially private learning needs better
features"), MNIST with 60,000 examples, noise multiplier 1.23, batch 512, 40 epochs, delta 1e-5,
reported as epsilon = 3 with the RDP accountant of the time. 40 epochs of 60000/512 batches are
4687.5 steps, so 4688 or 4690 depending on rounding; both are checked. Measured with
dp_accounting 0.6.0 (docs/privacy.md):

    steps   RDP      PLD (interval 1e-4)   classic RDP conversion
    4688    2.5811   2.3636                2.9949
    4690    2.5817   2.3641                2.9956

dp_accounting comes with the test extra (fbp[test] includes fbp[dp]), so these tests fail,
not skip, when it is missing. Tolerance 0.02: the figures are deterministic, so this only has to absorb changes in
dp_accounting (its RDP orders, its PLD grid); 0.02 is well below the 0.2-0.4 gaps between the
three accountants, so a test that passes still tells them apart.
"""

import math
import sys

import pytest

from fbp import privacy

N, SIGMA, BATCH, EPOCHS, DELTA = 60_000, 1.23, 512, 40, 1e-5
Q = BATCH / N
TOLERANCE = 0.02


@pytest.mark.parametrize("steps", [4688, 4690])
def test_rdp_matches_published_setting(steps):
    assert EPOCHS * N / BATCH == 4687.5  # the two roundings of the published step count
    assert privacy.epsilon(SIGMA, Q, steps, DELTA) == pytest.approx(2.58, abs=TOLERANCE)


@pytest.mark.parametrize("steps", [4688, 4690])
def test_pld_matches_published_setting(steps):
    # dp_accounting's default PLD grid (1e-4), about 0.5 s here; PLD is tighter than RDP
    assert privacy.epsilon(SIGMA, Q, steps, DELTA, accountant="pld") == pytest.approx(2.36, abs=TOLERANCE)


def test_classic_rdp_conversion_gives_the_published_three():
    """The paper's epsilon = 3 is the same RDP curve read with the classic conversion
    eps = min_a RDP(a) + log(1/delta) / (a - 1) (Mironov 2017, Prop. 3), which today's
    dp_accounting replaces by the tighter one of Canonne et al. 2020 (Prop. 12): same RDP
    curve, smaller epsilon."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    step = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 4690))
    classic = min(r + math.log(1 / DELTA) / (a - 1) for a, r in zip(accountant.orders, accountant.rdp) if a > 1)
    assert classic == pytest.approx(3.0, abs=TOLERANCE)
    assert classic > privacy.epsilon(SIGMA, Q, 4690, DELTA) + 0.3


def test_rdp_inverse_round_trips_published_setting():
    sigma = privacy.noise_multiplier_for_epsilon(2.58, Q, 4690, DELTA)
    # the published sigma, to the precision 2.58 carries (d eps / d sigma is about -3 here)
    assert sigma == pytest.approx(SIGMA, abs=0.005)
    # calibration never overspends: the returned noise meets the target
    assert privacy.epsilon(sigma, Q, 4690, DELTA) <= 2.58
    # and the exact round trip: Brent's method to 1e-6 in sigma
    exact = privacy.epsilon(SIGMA, Q, 4690, DELTA)
    assert privacy.noise_multiplier_for_epsilon(exact, Q, 4690, DELTA) == pytest.approx(SIGMA, abs=1e-5)


def test_pld_inverse_round_trips():
    # the calibration evaluates PLD about ten times, each costlier the smaller sigma is; this
    # setting takes 0.1-0.2 s an evaluation (MNIST's: 0.5 s), so the test stays at a few seconds
    q, steps, sigma = 0.01, 100, 3.0
    eps = privacy.epsilon(sigma, q, steps, DELTA, accountant="pld")
    found = privacy.noise_multiplier_for_epsilon(eps, q, steps, DELTA, accountant="pld")
    assert found == pytest.approx(sigma, abs=1e-4)
    assert privacy.epsilon(found, q, steps, DELTA, accountant="pld") <= eps + 1e-9
    # PLD reads the same noise more tightly, so it needs less noise for the same budget
    assert found < privacy.noise_multiplier_for_epsilon(eps, q, steps, DELTA)


def test_pld_calibration_falls_back_when_the_guess_misses(monkeypatch):
    """When PLD's sigma lies outside 0.7-1.05x RDP's (not seen in practice), the calibration
    falls back to dp_accounting's own bracket search and reaches the same answer."""
    import dp_accounting

    q, steps, sigma = 0.05, 100, 5.0  # 0.15 s a PLD evaluation
    eps = privacy.epsilon(sigma, q, steps, DELTA, accountant="pld")
    calibrate = dp_accounting.calibrate_dp_mechanism
    explicit = []

    def guess_misses(make_accountant, make_event, target, delta, bracket):
        if not isinstance(bracket, dp_accounting.ExplicitBracketInterval):
            return calibrate(make_accountant, make_event, target, delta, bracket)
        explicit.append(bracket)  # what brentq says when the interval does not bracket the root:
        raise ValueError("`brentq` raised ValueError. This often means the supplied bracket ...")

    monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", guess_misses)
    assert privacy.noise_multiplier_for_epsilon(eps, q, steps, DELTA, accountant="pld") == pytest.approx(
        sigma, abs=1e-4
    )
    assert len(explicit) == 1


def test_epsilon_is_monotone():
    base = privacy.epsilon(1.0, 0.01, 1000, DELTA)
    assert privacy.epsilon(1.5, 0.01, 1000, DELTA) < base  # more noise
    assert privacy.epsilon(1.0, 0.005, 1000, DELTA) < base  # smaller batches
    assert privacy.epsilon(1.0, 0.01, 500, DELTA) < base  # fewer steps
    assert privacy.epsilon(1.0, 0.01, 1000, 1e-3) < base  # larger delta


def test_zero_steps_spend_nothing():
    assert privacy.epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert privacy.epsilon(1.0, 0.01, 0, DELTA, accountant="pld") == 0.0


def test_full_batch_is_the_gaussian_mechanism():
    """q = 1: no sampling, plain composed Gaussian; the analytic Gaussian mechanism (Balle &
    Wang 2018) gives its exact epsilon, which PLD matches and RDP bounds from above."""
    import dp_accounting

    # 10 Gaussian steps of sigma compose to one of sigma / sqrt(10)
    exact = dp_accounting.get_epsilon_gaussian(2.0 / math.sqrt(10), DELTA)
    assert privacy.epsilon(2.0, 1.0, 10, DELTA, accountant="pld") == pytest.approx(exact, abs=0.01)
    assert privacy.epsilon(2.0, 1.0, 10, DELTA) >= exact


@pytest.mark.parametrize(
    "num_examples, expected",
    [(2, 0.1), (10, 0.1), (11, 0.01), (1000, 1e-3), (1001, 1e-4), (1797, 1e-4), (60_000, 1e-5), (100_000, 1e-5)],
)
def test_default_delta(num_examples, expected):
    delta = privacy.default_delta(num_examples)
    assert delta == expected
    assert delta <= 1 / num_examples


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, True, "60000"])
def test_default_delta_rejects(bad):
    with pytest.raises(ValueError, match="num_examples"):
        privacy.default_delta(bad)


BAD_EPSILON_ARGUMENTS = [
    ("noise_multiplier", 0.0),
    ("noise_multiplier", -1.0),
    ("noise_multiplier", math.inf),
    ("noise_multiplier", math.nan),
    ("sampling_rate", 0.0),
    ("sampling_rate", 1.5),
    ("sampling_rate", math.nan),
    ("steps", -1),
    ("steps", 10.0),
    ("steps", True),
    ("delta", 0.0),
    ("delta", 1.0),
    ("accountant", "gdp"),
]


@pytest.mark.parametrize("name, value", BAD_EPSILON_ARGUMENTS)
def test_epsilon_rejects(name, value):
    arguments = {"noise_multiplier": 1.0, "sampling_rate": 0.01, "steps": 100, "delta": DELTA, name: value}
    with pytest.raises(ValueError, match=name):
        privacy.epsilon(**arguments)


@pytest.mark.parametrize(
    "name, value",
    [("target_epsilon", 0.0), ("target_epsilon", math.inf), ("steps", 0), ("sampling_rate", 0.0), ("delta", 2.0)],
)
def test_noise_multiplier_for_epsilon_rejects(name, value):
    arguments = {"target_epsilon": 1.0, "sampling_rate": 0.01, "steps": 100, "delta": DELTA, name: value}
    with pytest.raises(ValueError, match=name):
        privacy.noise_multiplier_for_epsilon(**arguments)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # makes `import dp_accounting` fail
    with pytest.raises(ImportError, match=r'pip install "fbp\[dp\]"'):
        privacy.epsilon(1.0, 0.01, 100, DELTA)
    with pytest.raises(ImportError, match=r'pip install "fbp\[dp\]"'):
        privacy.noise_multiplier_for_epsilon(1.0, 0.01, 100, DELTA)
