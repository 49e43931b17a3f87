"""One part on its own: a layer's backward against jax.vjp, a loss's backward against jax.grad."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.compare import by_path, cast, compare_leaf, compare_trees, is_float, to_float64
from fbp.check.report import LayerReport, failed_row, raised_row
from fbp.check.tolerance import NOISE_FACTOR, Tolerance, larger, precision_of
from fbp.grads import check_is_layer
from fbp.layers.base import describe

# cotangent keys are salted: an unsalted PRNGKey(seed) (or its fold_in / split) is often the very key
# the caller drew x from, and dy == x makes x^T dy symmetric, hiding a transposed dW
_COTANGENT_SALT = 0x5A17


def cotangent_key(seed: int, index: int) -> jax.Array:
    """The key of the random cotangent for the ``index``-th layer checked."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _COTANGENT_SALT), index)


class LayerPair(NamedTuple):
    """One layer at one input (traced, or concrete once out of jit): both VJPs at a random cotangent.

    Attributes:
      params, x, key: what the layer was run on.
      dy: the cotangent, ~ N(0, 1) and shaped like y.
      reference: jax.vjp's ``(dparams, dx)``; dx None for an integer x.
      manual: ``layer.backward``'s ``(dparams, dx)``.
    """

    params: Any
    x: Any
    key: Any
    dy: Any
    reference: tuple
    manual: tuple


def vjp_reference(layer, params, x, dy, key, dtype: str | None = None):
    """jax.vjp of the layer's apply (params, float x and dy cast to ``dtype`` unless None): (dparams, dx)."""
    if dtype is not None:
        params, x, dy = cast((params, x, dy), dtype)
    if is_float(x):
        _, vjp = jax.vjp(lambda p, x: layer.apply(p, x, key=key), params, x)
        return vjp(dy)
    _, vjp = jax.vjp(lambda p: layer.apply(p, x, key=key), params)
    return vjp(dy)[0], None


def layer_pair(layer, params, x, key, dy_key) -> LayerPair:
    """Traced: a random cotangent dy ~ N(0, 1) shaped like y, and jax.vjp's and the manual (dparams, dx) at it."""
    y, cache = layer.forward(params, x, key=key)
    dy = jax.random.normal(dy_key, jnp.shape(y), jnp.result_type(y))
    return LayerPair(params, x, key, dy, vjp_reference(layer, params, x, dy, key), layer.backward(params, cache, dy))


def _leaves(dparams, dx) -> dict[str, Any]:
    """{path: leaf} of a layer's gradients: dparams by path, and ``"dx"`` (absent when None)."""
    return {**by_path(dparams), **({} if dx is None else {"dx": dx})}


def _vjp_rows(pair: LayerPair, tol: Tolerance, allowance: dict[str, float], floor: float):
    (ref_dparams, ref_dx), (dparams, dx) = pair.reference, pair.manual
    noise = {p: allowance.get(p, 0.0) + floor for p in [*by_path(ref_dparams), "dx"]}
    rows = compare_trees("vjp", ref_dparams, dparams, tol.rtol, tol.atol, noise=noise)
    if is_float(pair.x):
        rows.append(compare_leaf("vjp", "dx", ref_dx, dx, tol.rtol, tol.atol, noise["dx"]))
    elif dx is not None:
        rows.append(failed_row("vjp", "dx", jnp.shape(pair.x), "dx must be None for integer x"))
    return rows


def _layer_noise(layer, pair: LayerPair, tol: Tolerance) -> dict[str, np.ndarray]:
    """The measured rounding of jax.vjp's gradients (and below float32, of the manual backward's), by path."""
    other = tol.noise_precision

    def in_other_precision(params, x, dy):
        reference = vjp_reference(layer, params, x, dy, pair.key, other)
        if not tol.math_only:
            return reference, None
        cache = layer.forward(params, x, key=pair.key)[1]  # the forward as checked; only backward in float64
        return reference, layer.backward(*cast((params, cache, dy), other))

    with jax.enable_x64(True):
        other_reference, other_manual = jax.jit(in_other_precision)(pair.params, pair.x, pair.dy)
        noise = tol.noise(_leaves(*pair.reference), _leaves(*other_reference))
        if other_manual is not None:
            noise = larger(noise, tol.noise(_leaves(*pair.manual), _leaves(*other_manual)))
    return noise


def layer_report(layer, pair: LayerPair, settings: Tolerance) -> LayerReport:
    """Rows for one layer from its concrete pair; the rounding-noise estimate only if a row fails without it."""
    tol = settings.for_dtype(precision_of(pair.params, pair.x))
    floor = tol.zero_floor(*pair.reference)
    rows = _vjp_rows(pair, tol, {}, floor)
    if not all(r.ok for r in rows) and tol.measures_noise:  # only now pay for it: it can only widen the tolerance
        rows = _vjp_rows(pair, tol, tol.allowance(_layer_noise(layer, pair, tol)), floor)
    return LayerReport(describe(layer), rows)


def check_layer(
    layer,
    params,
    x,
    *,
    key=None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_factor: float = NOISE_FACTOR,
    hooks: bool = False,
) -> LayerReport:
    """Check one layer's backward against jax.vjp of its apply, with a random cotangent.

    Args:
      layer: any object with init/apply/forward/backward.
      params: its parameters.
      x: an input it accepts (with or without a batch axis).
      key: the layer's own PRNG key (Dropout): both sides, and the float64 rerun
        that measures rounding noise, use this key and so the same mask.
      seed: seeds the random cotangent dy ~ N(0, 1), shaped like y.
      rtol, atol, noise_factor: the tolerance rule (``fbp.check.tolerance``); rtol defaults by dtype.
      hooks: x's first axis is a batch: also check the layer's per-example hooks
        against jax.vmap of its backward (``fbp.check.hooks``), once that backward passes.

    Returns:
      A LayerReport with a row per dparams leaf and one for dx (which must be
      None for integer inputs), then the hook rows. A backward that raises is one failing row.
    """
    check_is_layer(layer, "check_layer")
    dy_key = cotangent_key(seed, 0)
    try:
        pair = jax.jit(lambda p, x: layer_pair(layer, p, x, key, dy_key))(params, x)
    except Exception as error:  # noqa: BLE001 - see which side raised
        jax.jit(lambda p, x: layer.apply(p, x, key=key))(params, x)  # a broken forward raises here, as it should
        return LayerReport(describe(layer), [raised_row("manual", "backward", (), error)])
    report = layer_report(layer, pair, Tolerance(rtol, atol, noise_factor))
    if hooks and report.ok:
        from fbp.check.hooks import check_hooks  # hooks.py builds on this module

        found = check_hooks(layer, params, x, key=key, seed=seed, settings=Tolerance(rtol, atol, noise_factor))
        report = LayerReport(report.layer, report.rows + found.rows)
    return report


def loss_gradient(loss, pred, y, dtype: str | None = None):
    """jax.grad of the loss with respect to the prediction (pred and y cast to ``dtype`` unless None)."""
    if dtype is not None:
        pred, y = cast((pred, y), dtype)
    return jax.grad(lambda p: loss(p, y))(pred)


def loss_backward(loss, pred, y):
    """The loss's hand-written dL/dpred."""
    return loss.backward(loss.forward(pred, y)[1])


def loss_report(loss, pred, y, reference, dpred, settings: Tolerance) -> LayerReport:
    """The loss's one row, ``dpred``, from concrete gradients; the rounding-noise estimate only if it fails."""
    tol = settings.for_dtype(precision_of(pred))
    row = compare_leaf("vjp", "dpred", reference, dpred, tol.rtol, tol.atol)
    if not row.ok and tol.measures_noise:
        precision = tol.noise_precision
        with jax.enable_x64(True):
            other = jax.jit(loss_gradient, static_argnums=(0, 3))(loss, *to_float64((pred, y)), precision)
            noise = tol.noise({"d": reference}, {"d": other}).get("d", 0.0)
            if tol.math_only:
                by_hand = jax.jit(lambda p, y: loss.backward(cast(loss.forward(p, y)[1], precision)))(pred, y)
                noise = np.maximum(noise, tol.noise({"d": dpred}, {"d": by_hand}).get("d", 0.0))
        row = compare_leaf("vjp", "dpred", reference, dpred, tol.rtol, tol.atol, tol.allowance({"d": noise})["d"])
    return LayerReport(describe(loss), [row])


def check_loss(loss, pred, y, *, rtol: float | None = None, atol: float = 0.0, noise_factor: float = NOISE_FACTOR):
    """Check a loss's backward against jax.grad of its value with respect to the prediction.

    Returns:
      A LayerReport named ``describe(loss)`` with one row, ``dpred``.
    """
    reference = jax.jit(loss_gradient, static_argnums=(0, 3))(loss, pred, y, None)
    try:
        dpred = jax.jit(loss_backward, static_argnums=0)(loss, pred, y)
    except Exception as error:  # noqa: BLE001 - a backward that raises is a failing row
        return LayerReport(describe(loss), [raised_row("manual", "dpred", jnp.shape(pred), error)])
    return loss_report(loss, pred, y, reference, dpred, Tolerance(rtol, atol, noise_factor))
