"""Training, a file per concept.

* ``step.py``: the jitted train step (``TrainState``, ``make_train_step``), the scan-fused
  epoch (``train_epoch``) and ``evaluate``: what the API gives a user who writes their own loop.
* ``fit.py``: the run loop behind ``fbp train`` (``TrainConfig``, ``fit``): data, epochs, faults.
* ``log.py``: what a run leaves to read: ``metrics.jsonl``, ``curves.png``, the progress bar.
* ``checkpoint.py``: the TrainState on disk (orbax-checkpoint), with a SHA-256 manifest.

Imports run one way: step <- fit, and log/checkpoint <- fit.
"""

from fbp.training import checkpoint, log
from fbp.training.fit import TrainConfig, TrainResult, fit
from fbp.training.step import (
    PRECISIONS,
    Policy,
    TrainState,
    TrainStep,
    epoch_strategy,
    evaluate,
    get_policy,
    make_train_step,
    train_epoch,
)

__all__ = [
    "PRECISIONS",
    "Policy",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainStep",
    "checkpoint",
    "epoch_strategy",
    "evaluate",
    "fit",
    "get_policy",
    "log",
    "make_train_step",
    "train_epoch",
]
