"""Training, a file per concept.

* ``step.py``: the jitted train step (``TrainState``, ``make_train_step``, ``TrainStep``).
* ``epoch.py``: an epoch of steps (``train_epoch``), as one ``lax.scan`` or a loop, whichever is faster.
* ``precision.py``: the mixed-precision ``Policy`` a step runs under.
* ``evaluate.py``: mean loss and accuracy over a data set (``evaluate``).
* ``fit.py``: the run loop behind ``fbp train`` (``TrainConfig``, ``fit``): data, epochs, outputs.
* ``dp.py``: what a DP-SGD run fixes before its first step (``PrivacyPlan``) and the epsilon it spends.
* ``faults.py``: a non-finite loss or gradient (``NonFiniteError``), a retrace of the step (``RetraceGuard``).
* ``log.py``: what a run leaves to read: ``metrics.jsonl``, ``curves.png``, the progress bar.
* ``checkpoint.py``: the TrainState on disk (orbax-checkpoint), with a SHA-256 manifest.

Imports run one way: precision <- step <- epoch <- fit; evaluate, dp, faults, log and checkpoint <- fit.
"""

from fbp.training import checkpoint, log
from fbp.training.epoch import EPOCH_STRATEGIES, epoch_strategy, train_epoch
from fbp.training.evaluate import evaluate
from fbp.training.fit import TrainConfig, TrainResult, fit
from fbp.training.precision import PRECISIONS, Policy, get_policy
from fbp.training.step import TrainState, TrainStep, make_train_step

__all__ = [
    "EPOCH_STRATEGIES",
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
