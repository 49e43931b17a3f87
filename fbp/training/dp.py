"""What a DP-SGD run fixes before its first step (noise, sampling, delta, padded batch size) and the epsilon it spends."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, NamedTuple

from fbp import data, privacy

if TYPE_CHECKING:
    from fbp.training.fit import TrainConfig


class PrivacyPlan(NamedTuple):
    """What a DP-SGD run fixes before its first step, and the epsilon it spends.

    Attributes:
      noise_multiplier: sigma (given, or calibrated to ``target_epsilon`` over ``steps``).
      sampling: ``"poisson"`` or ``"shuffle"``.
      sampling_rate: q = batch_size / N (the expected batch size q N is the batch size).
      steps: the run's total steps (epochs times steps per epoch), which the calibration covers.
      delta: the delta of every epsilon reported.
      accountant: ``"rdp"`` or ``"pld"``.
      max_batch_size: the padded batch size under Poisson sampling (``fbp.data.poisson_max_batch_size``
        over ``steps``); None for shuffled batches.
      target_epsilon: the target the noise was calibrated to, or None.
    """

    noise_multiplier: float
    sampling: str
    sampling_rate: float
    steps: int
    delta: float
    accountant: str
    max_batch_size: int | None
    target_epsilon: float | None

    def epsilon(self, steps: int) -> float:
        """The epsilon spent after ``steps`` steps (``fbp.privacy.epsilon``)."""
        with quiet_accountant():
            return privacy.epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta,
                                   accountant=self.accountant)

    def describe(self, config: TrainConfig, num_examples: int) -> str:
        """Two lines for the terminal: the mechanism, and what its guarantee covers."""
        noise = (f"noise multiplier {self.noise_multiplier:.4g} (calibrated to epsilon {self.target_epsilon:g} over "
                 f"{self.steps} steps)" if self.target_epsilon is not None
                 else f"noise multiplier {self.noise_multiplier:g}")
        default = " (the default: 1/N rounded down to a power of ten)" if config.delta is None else ""
        head = (f"DP-SGD: clip norm {config.clip_norm:g}, {noise}, delta {self.delta:g}{default}, "
                f"{self.accountant.upper()} accountant")
        if self.sampling == "poisson":
            return (f"{head}\nPoisson sampling: each of the {num_examples} examples joins a step with probability "
                    f"q = {config.batch_size}/{num_examples} = {self.sampling_rate:.4g}; batches padded to "
                    f"{self.max_batch_size} and masked; the noisy sum is divided by q N = {config.batch_size}")
        return (f"{head}\nfixed-size shuffled batches (--sampling shuffle): the accountant's guarantee assumes Poisson "
                "sampling; the epsilon printed is computed as if the batches were Poisson sampled, not proven for them")

    def as_dict(self, epsilon: float) -> dict:
        return {**self._asdict(), "epsilon": epsilon}


@contextlib.contextmanager
def quiet_accountant():
    """dp_accounting logs (absl, WARNING) each RDP order it excludes for not converging, dozens of lines per
    call at large sampling rates; the bound stays valid (an upper bound over the orders kept). Errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plan_privacy(config: TrainConfig, num_examples: int, steps: int, saved: dict | None = None) -> PrivacyPlan | None:
    """The PrivacyPlan of a DP-SGD run on ``num_examples`` examples over ``steps`` steps (None for other runs).

    ``saved`` (a resumed run's plan) is kept as it was, so the noise and the padded size stay those of the
    run being continued, whatever its new ``epochs``.
    """
    if not config.private:
        return None
    if saved:
        return PrivacyPlan(**{name: saved[name] for name in PrivacyPlan._fields})
    q = config.batch_size / num_examples
    delta = config.delta if config.delta is not None else privacy.default_delta(num_examples)
    if config.target_epsilon is not None:
        with quiet_accountant():
            sigma = privacy.noise_multiplier_for_epsilon(config.target_epsilon, q, steps, delta,
                                                         accountant=config.accountant)
    else:
        sigma = float(config.noise_multiplier)
    max_batch_size = None
    if config.batch_sampling == "poisson":
        max_batch_size = data.poisson_max_batch_size(num_examples, q, steps)
        if config.devices:  # a multiple of the devices, to split evenly
            max_batch_size = -(-max_batch_size // config.devices) * config.devices
    return PrivacyPlan(sigma, config.batch_sampling, q, steps, delta, config.accountant, max_batch_size,
                       config.target_epsilon)
