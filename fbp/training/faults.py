"""What can go wrong mid-run, named: a non-finite loss or gradient, a retrace of the compiled step."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np

from fbp.training.step import TrainStep


class NonFiniteError(FloatingPointError):
    """Training stopped on a NaN/Inf loss or gradient (``on_nonfinite="stop"``)."""


class RetraceWarning(RuntimeWarning):
    """The train step was traced again after warm-up: a new input shape or dtype, so a recompile."""


class RetraceGuard:
    """Counts traces of a TrainStep's function and warns (RetraceWarning) at each one after ``arm()``.

        guard = RetraceGuard(step)
        state, metrics = fbp.train_epoch(guard.step, state, xs, ys)  # the first epoch compiles
        guard.arm()                                                    # from now on, a trace is a recompile

    Attributes:
      step: the TrainStep to call instead of the original.
      traces: how many times its function has been traced.
    """

    def __init__(self, step: TrainStep):
        self.traces = 0
        self._armed = False

        def counted(state, x, y, mask=None):
            # Python runs this only while JAX traces, so the counter counts traces (a side effect on purpose)
            self.traces += 1
            if self._armed:
                warnings.warn(
                    f"fbp: the train step was traced again (trace {self.traces}, for x {x.shape} {x.dtype}, "
                    f"y {y.shape} {y.dtype}) after warm-up: a new input shape or dtype recompiles the step. "
                    "Keep every batch the same shape (drop or pad the last batch).",
                    RetraceWarning,
                    stacklevel=2,
                )
            return step.pure(state, x, y, mask)

        self.step = dataclasses.replace(step, pure=counted)

    def arm(self) -> None:
        """Every trace from now on warns."""
        self._armed = True


def first_nonfinite(value, grads) -> str | None:
    """``"loss"`` if ``value`` is NaN/Inf, else the path of the first gradient leaf holding one
    (e.g. ``"[2]['W']"``), else None."""
    if not np.all(np.isfinite(np.asarray(value))):
        return "loss"
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            return jax.tree_util.keystr(path)
    return None
