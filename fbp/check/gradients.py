"""``check_gradients``: the whole model's hand-written gradient against three witnesses, leaf by leaf; then the hooks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.compare import as_float64, by_path, cast, compare_trees, float_leaves, is_float
from fbp.check.finite_diff import FiniteDifferences, Objective, central_differences, probes
from fbp.check.hooks import check_hooks
from fbp.check.locate import find_first_bad_layer
from fbp.check.report import GradientReport, LeafCheck, raised_row
from fbp.check.tolerance import NOISE_FACTOR, Tolerance, larger, precision_of
from fbp.grads import check_is_layer, check_is_loss, check_params, per_example_grads, value_and_grad
from fbp.layers.base import describe, is_concrete, uses_key


@dataclasses.dataclass(frozen=True)
class _Gradients:
    """The gradients the witnesses compare, as concrete trees shaped like params.

    Attributes:
      reference: jax.grad of the loss through ``model.apply``.
      manual: the hand-written gradient (forward, loss backward, ``model.backward``); None if it raised.
      averaged: the mean of per-example manual gradients; None when not batched or it raised.
      gross: the mean of |per-example manual gradient| (the scale of the batch sum's rounding), or None.
      raised: a failing row for each of the manual and per-example gradients that raised.
      averaged_reference: what ``averaged`` must equal: the manual batch gradient; with a key the model
        draws random numbers from, jax.grad's mean of per-example gradients (example i gets the key
        fold_in(key, i) on both sides, as in training, so its mask is not the batch's).
    """

    reference: Any
    manual: Any
    averaged: Any
    gross: Any
    raised: list[LeafCheck]
    averaged_reference: Any = None


def _gradients(model, loss, params, x, y, batched: bool, key=None) -> _Gradients:
    """All three in one jit; when that raises, each alone, so a backward that raises is a failing row."""
    manual_fn = value_and_grad(model, loss, grad="manual")
    autodiff_fn = value_and_grad(model, loss, grad="autodiff")
    stacked_fn = per_example_grads(model, loss, grad="manual")  # jax.vmap over single examples
    stacked_reference = per_example_grads(model, loss, grad="autodiff") if key is not None else None

    def averaged_fn(params, x, y):
        stacked = stacked_fn(params, x, y, key)
        mean = jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked)
        gross = jax.tree_util.tree_map(lambda g: jnp.abs(g).mean(axis=0), stacked)
        if stacked_reference is None:
            return mean, gross, None
        return mean, gross, jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked_reference(params, x, y, key))

    def together(params, x, y):
        manual, reference = manual_fn(params, x, y, key)[1], autodiff_fn(params, x, y, key)[1]
        return manual, reference, averaged_fn(params, x, y) if batched else None

    raised = []
    try:
        manual, reference, averaged = jax.jit(together)(params, x, y)
    except Exception:  # noqa: BLE001 - one part raised; find which
        # a broken forward or bad inputs raise here, as they should
        reference = jax.jit(lambda p, x, y: autodiff_fn(p, x, y, key))(params, x, y)[1]
        manual, averaged = None, None
        try:
            manual = jax.jit(lambda p, x, y: manual_fn(p, x, y, key))(params, x, y)[1]
        except Exception as error:  # noqa: BLE001 - a backward that raises is a failing row
            raised.append(raised_row("manual", "<all>", (), error))
        if batched:
            try:
                averaged = jax.jit(averaged_fn)(params, x, y)
            except Exception as error:  # noqa: BLE001
                raised.append(raised_row("per-example", "<all>", (), error))
    averaged, gross, averaged_reference = averaged if averaged is not None else (None, None, None)
    return _Gradients(reference, manual, averaged, gross, raised, averaged_reference)


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
        against = grads.manual if grads.averaged_reference is None else grads.averaged_reference
        if grads.averaged is not None and against is not None:
            rows += compare_trees("per-example", against, grads.averaged, tol.rtol, tol.atol, noise=allowance)
        return rows


def _in_noise_precision(objective: Objective, tol: Tolerance, manual: bool):
    """Traced ``(params, x, y) -> (reference, by_hand, backward)``, all in ``tol.noise_precision``.

    reference: jax.grad; with ``manual``, also the manual gradient and the
    manual backward alone (from the forward pass and loss cache computed as
    given), else None for both. Trees shaped like params.
    """
    dtype, model, loss, key = tol.noise_precision, objective.model, objective.loss, objective.key

    def gradients(params, x, y):
        reference = jax.grad(objective.at)(cast(params, dtype), dtype)
        if not manual:
            return reference, None, None
        by_hand = value_and_grad(model, loss, grad="manual")(*objective.inputs(params, dtype), key)[1]
        pred, cache = model.forward(params, x, key=key)
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
    key=None,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_factor: float = NOISE_FACTOR,
    directions: int = 3,
    seed: int = 0,
    finite_differences: bool = True,
    per_example: bool = True,
    hooks: bool = True,
    locate: bool = True,
) -> GradientReport:
    """Check ``model.backward`` (through ``loss``) three ways, leaf by leaf, and every layer's per-example hooks.

    Args:
      model: the layer to check (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      params: the model's parameters.
      x: a batch of inputs, batch axis first.
      y: the batch's targets.
      key: a PRNG key for a model that draws random numbers (Dropout), as a train
        step passes it: every witness, the layer checks and the float64 reruns use
        this key and so the same mask. None: inference mode (Dropout is the identity).
      rtol, atol, noise_factor: see ``fbp.check.tolerance``; rtol defaults by dtype
        (``DEFAULT_RTOL``); noise_factor 0 turns the noise and zero-floor terms off.
      directions: finite-difference directions per leaf (the first is along the
        manual gradient itself, the rest random).
      seed: seeds the directions and the cotangents of the layer checks.
      finite_differences, per_example: turn a witness off (e.g. per_example for
        an unbatched x).
      hooks: check every layer's per-example hooks (the fast clipping path of a
        train step) against jax.vmap of its own backward (``fbp.check.hooks``),
        once the three witnesses pass (that backward is the reference); needs a
        batch: off with per_example.
      locate: on failure, find the first layer (or the loss) that is wrong on its own.

    Returns:
      A GradientReport; ``report.ok``, ``str(report)``, ``report.raise_if_failed()``.

    Raises:
      TypeError / ValueError: the inputs cannot be checked: ``model`` or ``loss``
        is not one, a params leaf does not fit the model (named), or x, y or
        params hold NaN or Inf (named: a NaN label makes every gradient NaN,
        whatever the backward, so it is the data that is wrong).
    """
    _check_inputs(model, loss, params, x, y)
    settings = Tolerance(rtol, atol, noise_factor)
    tol = settings.for_dtype(precision_of(params, x))
    key = key if key is not None and uses_key(model, params, x, key) else None  # a key nothing reads: as if none
    batched = jnp.ndim(x) >= 1 and jnp.ndim(y) >= 1
    grads = _gradients(model, loss, params, x, y, per_example and batched, key)
    witnesses = _Witnesses(tol, grads, _floors(tol, grads, params, jnp.shape(x)[0] if batched else 1))
    objective = Objective(model, loss, x, y, key)
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
        first_bad, layer_report = _locate(model, loss, params, x, y, settings, seed, per_example and batched, key)
    # the hooks' reference is each layer's own backward: worth checking against only once it is right
    checks_hooks = hooks and per_example and batched and _ok(rows)
    hook_check = check_hooks(model, params, x, key=key, seed=seed, settings=settings) if checks_hooks else None
    first_bad_hook = None
    if hook_check is not None:
        rows += hook_check.rows
        if hook_check.first_bad_layer is not None:  # every backward is right (else no hook check): name the hook
            first_bad, layer_report = hook_check.first_bad_layer, hook_check.layer_report
            first_bad_hook = f"{hook_check.first_bad_layer}.{hook_check.first_bad_hook}"
    return GradientReport(
        describe(model),
        rows,
        first_bad,
        layer_report,
        tol.dtype,
        tol.rtol,
        first_bad_hook,
        hook_check.layers if hook_check is not None else 0,
    )


def _check_inputs(model, loss, params, x, y) -> None:
    """Raise TypeError/ValueError for what cannot be checked, naming it: not a model or loss, params that do
    not fit the model, non-finite data or params (values are read only where concrete)."""
    check_is_layer(model, "check_gradients")
    check_is_loss(loss, "check_gradients")
    for name, tree in (("x", x), ("y", y), ("params", params)):
        for path, leaf in by_path(tree).items():
            if not (is_concrete(leaf) and is_float(leaf)):
                continue
            bad = ~np.isfinite(as_float64(leaf))
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                what = f"{name}{path}" if name == "params" else name
                blame = "the model's parameters" if name == "params" else "the data"
                raise ValueError(
                    f"check_gradients: {what} {tuple(np.shape(leaf))} holds {int(bad.sum())} non-finite value(s) "
                    f"(NaN or Inf), the first at index {first}: every gradient through it is NaN whatever the "
                    f"backward, so it is {blame} that is wrong; clean it before checking"
                )
    check_params(model, params, x)


def _ok(rows: list[LeafCheck]) -> bool:
    return all(r.ok for r in rows)


def _locate(model, loss, params, x, y, settings: Tolerance, seed: int, batched: bool, key=None):
    """The first layer (or the loss) wrong on its own: on the batch, else on the first example alone."""
    tolerances = settings.as_arguments()
    first_bad, report = find_first_bad_layer(model, params, x, key=key, loss=loss, y=y, seed=seed, **tolerances)
    if first_bad is None and batched and jnp.shape(x)[0] > 1:
        one = {"loss": loss, "y": y[0], "seed": seed, "key": key}
        first_bad, report = find_first_bad_layer(model, params, x[0], **one, **tolerances)
        if first_bad is not None:
            first_bad += " (on one example, x[0])"
    return first_bad, report
