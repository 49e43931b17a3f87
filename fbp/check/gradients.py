"""``check_gradients``: the whole model's hand-written gradient against three witnesses, leaf by leaf."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.compare import as_float64, by_path, cast, compare_trees, float_leaves
from fbp.check.finite_diff import FiniteDifferences, Objective, central_differences, probes
from fbp.check.locate import find_first_bad_layer
from fbp.check.report import GradientReport, LeafCheck, raised_row
from fbp.check.tolerance import NOISE_FACTOR, Tolerance, larger, precision_of
from fbp.grads import per_example_grads, value_and_grad
from fbp.layers.base import describe


@dataclasses.dataclass(frozen=True)
class _Gradients:
    """The gradients the witnesses compare, as concrete trees shaped like params.

    Attributes:
      reference: jax.grad of the loss through ``model.apply``.
      manual: the hand-written gradient (forward, loss backward, ``model.backward``); None if it raised.
      averaged: the mean of per-example manual gradients; None when not batched or it raised.
      gross: the mean of |per-example manual gradient| (the scale of the batch sum's rounding), or None.
      raised: a failing row for each of the manual and per-example gradients that raised.
    """

    reference: Any
    manual: Any
    averaged: Any
    gross: Any
    raised: list[LeafCheck]


def _gradients(model, loss, params, x, y, batched: bool) -> _Gradients:
    """All three in one jit; when that raises, each alone, so a backward that raises is a failing row."""
    manual_fn = value_and_grad(model, loss, grad="manual")
    autodiff_fn = value_and_grad(model, loss, grad="autodiff")
    stacked_fn = per_example_grads(model, loss, grad="manual")  # jax.vmap over single examples

    def averaged_fn(params, x, y):
        stacked = stacked_fn(params, x, y)
        mean = jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked)
        return mean, jax.tree_util.tree_map(lambda g: jnp.abs(g).mean(axis=0), stacked)

    def together(params, x, y):
        return manual_fn(params, x, y)[1], autodiff_fn(params, x, y)[1], averaged_fn(params, x, y) if batched else None

    raised = []
    try:
        manual, reference, averaged = jax.jit(together)(params, x, y)
    except Exception:  # noqa: BLE001 - one part raised; find which
        reference = jax.jit(autodiff_fn)(params, x, y)[1]  # a broken forward or bad inputs raise here, as they should
        manual, averaged = None, None
        try:
            manual = jax.jit(manual_fn)(params, x, y)[1]
        except Exception as error:  # noqa: BLE001 - a backward that raises is a failing row
            raised.append(raised_row("manual", "<all>", (), error))
        if batched:
            try:
                averaged = jax.jit(averaged_fn)(params, x, y)
            except Exception as error:  # noqa: BLE001
                raised.append(raised_row("per-example", "<all>", (), error))
    averaged, gross = averaged if averaged is not None else (None, None)
    return _Gradients(reference, manual, averaged, gross, raised)


def _floors(tol: Tolerance, grads: _Gradients, params, batch: int) -> dict[str, np.ndarray]:
    """By float leaf of params, the elementwise allowance every witness grants: batch-sum rounding and zero floor.

    The batch-sum term matters where the sum over the batch cancels to ~0; the
    zero floor is eps times the largest gradient element. A misshapen manual
    gradient gets no batch-sum term: its own row fails on the shape.
    """
    sums = tol.sum_floor(grads.gross, batch) if grads.gross is not None else {}
    zero = tol.zero_floor(grads.reference)
    return {
        p: (sums[p] if np.shape(sums.get(p)) == np.shape(leaf) else 0.0) + zero * np.ones(np.shape(leaf))
        for p, leaf in float_leaves(params).items()
    }


@dataclasses.dataclass(frozen=True)
class _Witnesses:
    """The three witnesses' rows, for a given measured rounding noise."""

    tol: Tolerance
    grads: _Gradients
    floors: dict[str, np.ndarray]
    finite_differences: FiniteDifferences | None = None

    def rows(self, same: dict | None = None, to_truth: dict | None = None) -> list[LeafCheck]:
        """``same``: by path, rounding between same-precision gradients; ``to_truth``: between the dtype and
        float64 (for finite differences). None: not measured."""
        tol, grads = self.tol, self.grads
        allowance = tol.allowance(same or {})
        allowance = {p: allowance.get(p, 0.0) + floor for p, floor in self.floors.items()}
        rows = list(grads.raised)
        if grads.manual is not None:
            rows = compare_trees("autodiff", grads.reference, grads.manual, tol.rtol, tol.atol, noise=allowance) + rows
        if self.finite_differences is not None:
            rows += self.finite_differences.rows(tol, to_truth or {}, self.floors)
        if grads.averaged is not None and grads.manual is not None:
            rows += compare_trees("per-example", grads.manual, grads.averaged, tol.rtol, tol.atol, noise=allowance)
        return rows


def _in_noise_precision(objective: Objective, tol: Tolerance, manual: bool):
    """Traced ``(params, x, y) -> (reference, by_hand, backward)``, all in ``tol.noise_precision``.

    reference: jax.grad; with ``manual``, also the manual gradient and the
    manual backward alone (from the forward pass and loss cache computed as
    given), else None for both. Trees shaped like params.
    """
    dtype, model, loss = tol.noise_precision, objective.model, objective.loss

    def gradients(params, x, y):
        reference = jax.grad(objective.at)(cast(params, dtype), dtype)
        if not manual:
            return reference, None, None
        by_hand = value_and_grad(model, loss, grad="manual")(*objective.inputs(params, dtype))[1]
        pred, cache = model.forward(params, x)
        _, loss_cache = loss.forward(pred, y)
        params, cache, loss_cache = cast((params, cache, loss_cache), dtype)
        return reference, by_hand, model.backward(params, cache, loss.backward(loss_cache))[0]

    return gradients


def _measured_noise(tol: Tolerance, grads: _Gradients, other) -> tuple[dict, dict]:
    """(same, to_truth) noise by path (see ``_Witnesses.rows``) from the gradients in the noise precision."""
    reference, by_hand, backward = other
    same = to_truth = tol.noise(by_path(grads.reference), by_path(reference))
    if by_hand is not None:  # the manual backward's own rounding, and the whole manual gradient's (math_only)
        manual = by_path(grads.manual)
        same = larger(same, tol.noise(manual, by_path(backward)))
        to_truth = larger(to_truth, tol.noise(manual, by_path(by_hand)))
    return same, to_truth


def check_gradients(
    model,
    loss,
    params,
    x,
    y,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_factor: float = NOISE_FACTOR,
    directions: int = 3,
    seed: int = 0,
    finite_differences: bool = True,
    per_example: bool = True,
    locate: bool = True,
) -> GradientReport:
    """Check ``model.backward`` (through ``loss``) three ways, leaf by leaf.

    Args:
      model: the layer to check (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      params: the model's parameters.
      x: a batch of inputs, batch axis first.
      y: the batch's targets.
      rtol, atol, noise_factor: see ``fbp.check.tolerance``; rtol defaults by dtype
        (``DEFAULT_RTOL``); noise_factor 0 turns the noise and zero-floor terms off.
      directions: finite-difference directions per leaf (the first is along the
        manual gradient itself, the rest random).
      seed: seeds the directions and the cotangents of the layer checks.
      finite_differences, per_example: turn a witness off (e.g. per_example for
        an unbatched x).
      locate: on failure, find the first layer (or the loss) that is wrong on its own.

    Returns:
      A GradientReport; ``report.ok``, ``str(report)``, ``report.raise_if_failed()``.
    """
    settings = Tolerance(rtol, atol, noise_factor)
    tol = settings.for_dtype(precision_of(params, x))
    batched = per_example and jnp.ndim(x) >= 1 and jnp.ndim(y) >= 1
    grads = _gradients(model, loss, params, x, y, batched)
    witnesses = _Witnesses(tol, grads, _floors(tol, grads, params, jnp.shape(x)[0] if batched else 1))
    objective = Objective(model, loss, x, y)
    # the rounding-noise estimate can only widen the tolerance: pay for it only when a row fails without it,
    # in the same compile as the finite differences when the same-precision rows already do
    in_noise_precision = _in_noise_precision(objective, tol, tol.math_only and grads.manual is not None)
    need_noise = tol.measures_noise and not _ok(witnesses.rows())
    other = None
    if finite_differences:
        leaf_probes = probes(params, by_path(grads.manual) if grads.manual is not None else {}, directions, seed)
        fd, other = central_differences(objective, params, leaf_probes, in_noise_precision if need_noise else None)
        witnesses = dataclasses.replace(witnesses, finite_differences=fd)
    rows = witnesses.rows()
    if not _ok(rows) and tol.measures_noise:
        if other is None:
            with jax.enable_x64(True):
                other = jax.tree_util.tree_map(as_float64, jax.jit(in_noise_precision)(params, x, y))
        rows = witnesses.rows(*_measured_noise(tol, grads, other))
    first_bad, layer_report = None, None
    if locate and not _ok(rows):
        first_bad, layer_report = _locate(model, loss, params, x, y, settings, seed, batched)
    return GradientReport(describe(model), rows, first_bad, layer_report, tol.dtype, tol.rtol)


def _ok(rows: list[LeafCheck]) -> bool:
    return all(r.ok for r in rows)


def _locate(model, loss, params, x, y, settings: Tolerance, seed: int, batched: bool):
    """The first layer (or the loss) wrong on its own: on the batch, else on the first example alone."""
    tolerances = settings.as_arguments()
    first_bad, report = find_first_bad_layer(model, params, x, loss=loss, y=y, seed=seed, **tolerances)
    if first_bad is None and batched and jnp.shape(x)[0] > 1:
        first_bad, report = find_first_bad_layer(model, params, x[0], loss=loss, y=y[0], seed=seed, **tolerances)
        if first_bad is not None:
            first_bad += " (on one example, x[0])"
    return first_bad, report
