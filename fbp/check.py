"""The gradient checker: is the hand-written backward right, leaf by leaf?

Three independent witnesses:

1. ``autodiff``: the manual gradient against jax.grad of the same forward,
   element by element, in the same precision.
2. ``finite-diff``: directional derivatives of the loss by central finite
   differences in float64 (params and inputs cast up), against
   <manual gradient, direction>, along the manual gradient itself and along
   random directions. Independent of jax.grad.
3. ``per-example``: the average of per-example manual gradients (jax.vmap over
   single examples) against the batch manual gradient. Catches a backward that
   is right for one example and wrong for a batch.

When any fails, every layer is checked on its own (``check_layer``: its
backward against jax.vjp with a random cotangent, on the input it really sees
in the model), then the loss (its backward against jax.grad), and the report
names the first one, in forward order, that disagrees. If none does on the
batch, the same search runs on the first example alone.

Tolerance rule (docs/checker.md has the measurements behind it). For a leaf with
reference r and candidate c, element i passes when

    |c_i - r_i| <= atol + rtol (|r_i| + rms(r)) + NOISE_FACTOR (max(noise) + eps G) + sum_i

* ``rtol`` covers rounding in well-conditioned sums; it defaults by the lowest
  float precision among params and x (``DEFAULT_RTOL``: float64 1e-9, float32
  1e-4, float16 1e-2, bfloat16 3e-2). The rms term is the scale of the rounding
  of a sum: an element that nearly cancels carries the rounding of the terms
  summed into it, not of its own small value. Size enters through rms(r) and
  the terms below, which grow with the leaf and with the sums behind it.
* ``noise`` is the measured rounding of this very gradient, for ill-conditioned
  ones (mostly cancellation: LayerNorm over few features): |jax.grad in the
  dtype - jax.grad in float64|, elementwise. For float64 there is nothing
  higher, so it is the float32 noise times eps(float64) / eps(float32). Below
  float32 the manual backward's own rounding counts too (see ``_math_only``).
  It is computed only when a row fails without it, since it can only widen.
* ``eps G``: eps of the dtype times G, the largest gradient element in the
  model (or layer): in this precision anything below is zero (``_zero_floor``).
* ``sum_i = SUM_FACTOR max(1, log2 B) eps mean_j |g_j,i|`` is the rounding of a
  pairwise sum over a batch of B examples with per-example gradients g_j (XLA
  sums low precisions in float32, so this is generous there): a gradient that
  is exactly 0 by symmetry (balanced labels) is such a cancelling sum, and
  jax's own noise there is often exactly 0 too.

For a finite-difference direction v (unit norm) on a leaf with manual gradient g:

    |fd - <g, v>| <= fd_atol + max(rtol, FD_RTOL) ||g|| + NOISE_FACTOR (||noise|| + eps G sqrt(size)) + ||sum||,

since |<e, v>| <= ||e||. The float64 central difference with step
h = 1e-6 max(1, ||leaf||) has truncation error ~h^2 and rounding error
~eps64 |L| / h, so ``fd_atol = 16 eps64 (1 + |L|) / h`` and ``FD_RTOL = 1e-7``.
Each direction is also differenced with steps h/10 and h/100 and the closest
estimate counts: a ReLU or max-pool kink within a step of the point spoils the
longer steps only, while a wrong gradient disagrees with all three.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.grads import per_example_grads, value_and_grad
from fbp.layers.base import call_apply, call_forward, describe
from fbp.layers.combinators import Residual, Sequential

DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
NOISE_FACTOR = 4.0  # how much noisier than measured a correct gradient may be
FD_RTOL = 1e-7  # float64 central differences: truncation + rounding, relative to ||g||
FD_STEPS = (1.0, 0.1, 0.01)  # step multiples; the closest estimate counts (kinks)
SUM_FACTOR = 4.0  # times the rounding of a pairwise batch sum, log2(B) eps mean_j |g_j|
_PROBE = "float32"  # the lower precision whose noise, scaled, stands in for float64's
# cotangent keys are salted: an unsalted PRNGKey(seed) (or its fold_in / split) is often the very key
# the caller drew x from, and dy == x makes x^T dy symmetric, hiding a transposed dW
_COTANGENT_SALT = 0x5A17


class GradientCheckError(AssertionError):
    """Raised by ``raise_if_failed``; its message is the report's table."""


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """One leaf compared by one witness.

    Attributes:
      check: "autodiff", "finite-diff", "per-example", "vjp" or "manual" (the
        manual backward raised).
      path: the leaf, e.g. ``"[2]['W']"``; ``"dx"`` or ``"dpred"`` in layer reports.
      shape: the reference's shape.
      max_abs_err: largest |c - r|.
      max_rel_err: largest |c - r| / (|r| + rms(r)); for finite-diff, / ||g||.
      worst_index: element (or direction, for finite-diff) furthest out of tolerance.
      cosine: between candidate and reference (finite-diff: between the
        difference quotients and the analytic directional derivatives).
      ok: every element within tolerance.
      excess: largest error / its allowance; the row fails when it exceeds 1.
    """

    check: str
    path: str
    shape: tuple
    max_abs_err: float
    max_rel_err: float
    worst_index: Any
    cosine: float
    ok: bool
    excess: float = float("nan")


def _table(rows: list[LeafCheck]) -> str:
    header = ("check", "leaf", "shape", "max abs err", "max rel err", "worst at", "cosine", "err/tol", "")
    lines = [header] + [
        (
            r.check,
            r.path,
            str(r.shape),
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            str(r.worst_index),
            f"{r.cosine:.6f}",
            f"{r.excess:.2g}",
            "ok" if r.ok else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """``check_layer``'s verdict on one layer: rows for every dparams leaf and dx."""

    layer: str
    rows: list[LeafCheck]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def __str__(self) -> str:
        return f"{self.layer}: {'ok' if self.ok else 'FAILED'}\n{_table(self.rows)}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise GradientCheckError(str(self))


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """``check_gradients``' verdict. ``str(report)`` is the per-leaf table.

    Attributes:
      model: the model's short name.
      rows: one LeafCheck per (witness, leaf).
      first_bad_layer: ``"[2] Dense(10)"``-style name (path, then layer) of the
        first layer whose own backward disagrees with jax.vjp; ``"loss MSE()"``
        when only the loss's backward is wrong; None when nothing failed or no
        single part is wrong on its own.
      layer_report: that layer's LayerReport, or None.
      dtype: the precision the tolerances were chosen for.
      rtol: the relative tolerance used.
    """

    model: str
    rows: list[LeafCheck]
    first_bad_layer: str | None
    layer_report: LayerReport | None
    dtype: str
    rtol: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[LeafCheck]:
        return [r for r in self.rows if not r.ok]

    @property
    def failed_leaves(self) -> list[str]:
        """Paths of the leaves that failed any witness, in first-seen order."""
        return list(dict.fromkeys(r.path for r in self.failures))

    @property
    def first_bad_path(self) -> str | None:
        """Just the path of ``first_bad_layer``: ``"[2]"``, ``"[1].block[0]"``, ``"model"`` or ``"loss"``."""
        return None if self.first_bad_layer is None else self.first_bad_layer.split(" ", 1)[0]

    def __str__(self) -> str:
        head = f"gradient check of {self.model} ({self.dtype}, rtol {self.rtol:g}): "
        head += "ok" if self.ok else f"FAILED ({len(self.failures)} of {len(self.rows)} rows)"
        text = f"{head}\n{_table(self.rows)}"
        if not self.ok:
            where = self.first_bad_layer or "no single layer or loss disagrees with jax on its own"
            text += f"\nfirst wrong layer: {where}"
            if self.layer_report is not None:
                text += f"\n{self.layer_report}"
        return text

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise GradientCheckError(str(self))


# --- comparing trees -------------------------------------------------------


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def precision_of(*trees) -> str:
    """The lowest float precision (largest epsilon) among the trees' leaves, as a dtype name."""
    dtypes = [jnp.result_type(leaf) for tree in trees for leaf in jax.tree_util.tree_leaves(tree) if _is_float(leaf)]
    if not dtypes:
        return "float32"
    return str(max(dtypes, key=lambda d: float(jnp.finfo(d).eps)))


def default_rtol(dtype: str) -> float:
    """``DEFAULT_RTOL[dtype]``; for a float type not listed, 64 machine epsilons."""
    return DEFAULT_RTOL.get(dtype, 64 * float(jnp.finfo(dtype).eps))


def _by_path(tree) -> dict[str, Any]:
    """{keystr path: leaf}; None leaves (no gradient) are simply absent."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _numpy(leaf) -> np.ndarray:
    return np.asarray(leaf, dtype=np.float64)


def _cosine(c: np.ndarray, r: np.ndarray) -> float:
    norms = np.linalg.norm(c) * np.linalg.norm(r)
    if norms > 0:
        return float(np.vdot(c, r) / norms)
    return 1.0 if not c.any() and not r.any() else 0.0


def _failed_row(check: str, path: str, shape, why: str) -> LeafCheck:
    return LeafCheck(check, path, tuple(shape), np.inf, np.inf, why, float("nan"), False, np.inf)


def compare_leaf(
    check: str, path: str, reference, candidate, rtol: float, atol: float = 0.0, noise: float = 0.0
) -> LeafCheck:
    """Compare one leaf element by element: |c - r| <= atol + noise + rtol (|r| + rms(r)).

    ``noise`` is the absolute allowance for measured rounding, already scaled
    (``NOISE_FACTOR * max noise`` under the module's rule).
    """
    r = _numpy(reference)
    shape = tuple(r.shape)
    if candidate is None:
        return _failed_row(check, path, shape, "missing")
    if np.shape(candidate) != shape:
        return _failed_row(check, path, shape, f"shape {tuple(np.shape(candidate))}")
    c = _numpy(candidate)
    if r.size == 0:
        return LeafCheck(check, path, shape, 0.0, 0.0, "-", 1.0, True, 0.0)
    err = np.abs(c - r)
    err = np.where(np.isnan(err), np.inf, err)
    scale = np.abs(r) + np.sqrt(np.mean(r * r))
    if np.shape(noise) not in ((), shape):  # measured on a misshapen gradient: no allowance from it
        noise = 0.0
    allowed = atol + noise + rtol * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(err == 0, 0.0, err / scale)
        excess = np.where(err == 0, 0.0, err / allowed)
    worst = np.unravel_index(int(np.argmax(excess)), shape) if shape else ()
    return LeafCheck(
        check,
        path,
        shape,
        float(err.max()),
        float(rel.max()),
        tuple(int(i) for i in worst),
        _cosine(c, r),
        bool(np.all(err <= allowed)),
        float(excess.max()),
    )


def compare_trees(
    check: str, reference, candidate, rtol: float, atol: float = 0.0, prefix: str = "", noise=None
) -> list[LeafCheck]:
    """Compare two pytrees leaf by leaf, matched by path.

    A leaf missing from ``candidate`` or one it has in excess is a failing row.
    ``noise`` maps a path to its scaled noise allowance (see ``compare_leaf``).
    """
    noise = noise or {}
    ref, cand = _by_path(reference), _by_path(candidate)
    rows = [compare_leaf(check, prefix + p, r, cand.get(p), rtol, atol, noise.get(p, 0.0)) for p, r in ref.items()]
    rows += [_failed_row(check, prefix + p, np.shape(c), "not a parameter") for p, c in cand.items() if p not in ref]
    return rows


def _cast(tree, dtype):
    """Float leaves to ``dtype`` (under jit); integer leaves (labels, ids) unchanged."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def _to_float64(tree):
    """Float leaves as float64 numpy arrays, others as numpy arrays: safe to pass into an x64 jit."""
    return jax.tree_util.tree_map(lambda a: _numpy(a) if _is_float(a) else np.asarray(a), tree)


def _noise(native, other, dtype: str) -> dict[str, np.ndarray]:
    """Elementwise rounding noise of a reference computed in ``dtype``, by path.

    ``other`` is the same reference computed in float64, or for a float64
    ``dtype`` in the probe precision (float32), whose noise is scaled down by
    the ratio of the machine epsilons.
    """
    scale = float(jnp.finfo(np.float64).eps / jnp.finfo(_PROBE).eps) if dtype == "float64" else 1.0
    other = _by_path(other)
    return {
        p: scale * np.abs(_numpy(r) - _numpy(other[p]))
        for p, r in _by_path(native).items()
        if p in other and np.shape(r) == np.shape(other[p])
    }


def _math_only(dtype: str) -> bool:
    """Below float32 (bfloat16, float16) the manual backward's own rounding counts as noise too.

    There a correct backward can be far noisier than jax.grad's (LayerNorm over 2
    features: cancellation that jax's formula happens to do exactly), and no
    tolerance both admits that and still detects anything: so in these dtypes
    the checker verifies the backward's mathematics, measuring its rounding as
    |manual in dtype - the same manual code in float64|. A logic bug is wrong in
    float64 too and still shows; a bug that exists only in low precision does not.
    """
    return float(jnp.finfo(dtype).eps) > float(jnp.finfo(np.float32).eps)


def _larger(a: dict, b: dict) -> dict:
    """Elementwise max of two noise dicts (by path)."""
    return {p: np.maximum(n, b[p]) if p in b and np.shape(b[p]) == np.shape(n) else n for p, n in a.items()}


def _noise_scales(noise: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """path -> (largest element, norm) of a leaf's rounding noise."""
    return {p: (float(n.max(initial=0.0)), float(np.linalg.norm(n))) for p, n in noise.items()}


# --- one layer -------------------------------------------------------------


def _vjp_reference(layer, params, x, dy, key, dtype):
    """jax.vjp of the layer's apply (params, float x and dy cast to ``dtype`` unless None): (dparams, dx)."""
    if dtype is not None:
        params, x, dy = _cast((params, x, dy), dtype)
    if _is_float(x):
        _, vjp = jax.vjp(lambda p, x: call_apply(layer, p, x, key), params, x)
        return vjp(dy)
    _, vjp = jax.vjp(lambda p: call_apply(layer, p, x, key), params)
    return vjp(dy)[0], None


def _zero_floor(dtype: str, *trees) -> float:
    """eps(dtype) times the largest gradient element anywhere: in this precision, anything below is 0.

    A leaf whose exact gradient is 0 or nearly (LayerNorm over 1 or 2 features
    stops almost all of it) gets only the rounding of the terms that cancelled,
    whose scale is the gradients around it, not its own.
    """
    largest = max(
        (float(np.max(np.abs(_numpy(a)), initial=0.0)) for t in trees for a in jax.tree_util.tree_leaves(t)),
        default=0.0,
    )
    return float(jnp.finfo(dtype).eps) * largest


def _layer_rows(check, ref_dparams, ref_dx, dparams, dx, x, rtol, atol, noise, floor=0.0):
    noise = {p: noise.get(p, 0.0) + floor for p in [*_by_path(ref_dparams), "dx"]}
    rows = compare_trees(check, ref_dparams, dparams, rtol, atol, noise=noise)
    if _is_float(x):
        rows.append(compare_leaf(check, "dx", ref_dx, dx, rtol, atol, noise.get("dx", 0.0)))
    elif dx is not None:
        rows.append(_failed_row(check, "dx", jnp.shape(x), "dx must be None for integer x"))
    return rows


def _cotangent_key(seed: int, index: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _COTANGENT_SALT), index)


def _layer_pair(layer, params, x, key, dy_key):
    """Traced: a random cotangent dy ~ N(0, 1) shaped like y, jax.vjp's (dparams, dx) and the manual ones."""
    y, cache = call_forward(layer, params, x, key)
    dy = jax.random.normal(dy_key, jnp.shape(y), jnp.result_type(y))
    return dy, _vjp_reference(layer, params, x, dy, key, None), layer.backward(params, cache, dy)


def _layer_report(layer, params, x, key, dy, reference, manual, rtol, atol, noise_factor) -> LayerReport:
    """Rows for one layer from concrete results; the rounding-noise estimate only if a row fails."""
    dtype = precision_of(params, x)
    rtol = default_rtol(dtype) if rtol is None else rtol
    (ref_dparams, ref_dx), (dparams, dx) = reference, manual
    floor = noise_factor * _zero_floor(dtype, ref_dparams, ref_dx)
    rows = _layer_rows("vjp", ref_dparams, ref_dx, dparams, dx, x, rtol, atol, {}, floor)
    if all(r.ok for r in rows) or noise_factor == 0:
        return LayerReport(describe(layer), rows)
    # only now pay for the rounding-noise estimate: it can only widen the tolerance
    other = "float64" if dtype != "float64" else _PROBE

    def in_other_precision(params, x, dy):
        reference = _vjp_reference(layer, params, x, dy, key, other)
        if not _math_only(dtype):
            return reference, None
        cache = call_forward(layer, params, x, key)[1]  # the forward as checked; only backward in float64
        return reference, layer.backward(*_cast((params, cache, dy), other))

    with jax.enable_x64(True):
        (other_dparams, other_dx), other_manual = jax.jit(in_other_precision)(params, x, dy)
        native = {"dparams": ref_dparams, "dx": ref_dx}
        noise = _noise(native, {"dparams": other_dparams, "dx": other_dx}, dtype)
        if other_manual is not None:
            by_hand = {"dparams": other_manual[0], "dx": other_manual[1]}
            noise = _larger(noise, _noise({"dparams": dparams, "dx": dx}, by_hand, dtype))
    allowance = {
        path.removeprefix("['dparams']") if path.startswith("['dparams']") else "dx": noise_factor * largest
        for path, (largest, _) in _noise_scales(noise).items()
    }
    rows = _layer_rows("vjp", ref_dparams, ref_dx, dparams, dx, x, rtol, atol, allowance, floor)
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
) -> LayerReport:
    """Check one layer's backward against jax.vjp of its apply, with a random cotangent.

    Args:
      layer: any object with init/apply/forward/backward.
      params: its parameters.
      x: an input it accepts (with or without a batch axis).
      key: the layer's own PRNG key (Dropout); the same key is used for both sides.
      seed: seeds the random cotangent dy ~ N(0, 1), shaped like y.
      rtol, atol, noise_factor: the tolerance rule of this module; rtol defaults by dtype.

    Returns:
      A LayerReport with a row per dparams leaf and one for dx (which must be
      None for integer inputs). A backward that raises is one failing row.
    """
    dy_key = _cotangent_key(seed, 0)
    try:
        dy, reference, manual = jax.jit(lambda p, x: _layer_pair(layer, p, x, key, dy_key))(params, x)
    except Exception as error:  # noqa: BLE001 - see which side raised
        jax.jit(lambda p, x: call_apply(layer, p, x, key))(params, x)  # a broken forward raises here, as it should
        return LayerReport(describe(layer), [_failed_row("manual", "backward", (), _raised(error))])
    return _layer_report(layer, params, x, key, dy, reference, manual, rtol, atol, noise_factor)


def _raised(error: Exception) -> str:
    text = f"raised {type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _loss_gradient(loss, pred, y, dtype):
    if dtype is not None:
        pred, y = _cast((pred, y), dtype)
    return jax.grad(lambda p: loss(p, y))(pred)


def _loss_report(loss, pred, y, reference, dpred, rtol, atol, noise_factor) -> LayerReport:
    dtype = precision_of(pred)
    rtol = default_rtol(dtype) if rtol is None else rtol
    row = compare_leaf("vjp", "dpred", reference, dpred, rtol, atol)
    if not row.ok and noise_factor > 0:
        with jax.enable_x64(True):
            precision = "float64" if dtype != "float64" else _PROBE
            other = jax.jit(_loss_gradient, static_argnums=(0, 3))(loss, *_to_float64((pred, y)), precision)
            noise = _noise({"d": reference}, {"d": other}, dtype)["['d']"]
            if _math_only(dtype):
                by_hand = jax.jit(lambda p, y: loss.backward(_cast(loss.forward(p, y)[1], precision)))(pred, y)
                noise = np.maximum(noise, _noise({"d": dpred}, {"d": by_hand}, dtype)["['d']"])
        row = compare_leaf("vjp", "dpred", reference, dpred, rtol, atol, noise_factor * float(noise.max(initial=0.0)))
    return LayerReport(describe(loss), [row])


def check_loss(loss, pred, y, *, rtol: float | None = None, atol: float = 0.0, noise_factor: float = NOISE_FACTOR):
    """Check a loss's backward against jax.grad of its value with respect to the prediction.

    Returns:
      A LayerReport named ``describe(loss)`` with one row, ``dpred``.
    """
    reference = jax.jit(_loss_gradient, static_argnums=(0, 3))(loss, pred, y, None)
    try:
        dpred = jax.jit(lambda pred, y: loss.backward(loss.forward(pred, y)[1]))(pred, y)
    except Exception as error:  # noqa: BLE001 - a backward that raises is a failing row
        return LayerReport(describe(loss), [_failed_row("manual", "dpred", jnp.shape(pred), _raised(error))])
    return _loss_report(loss, pred, y, reference, dpred, rtol, atol, noise_factor)


def _children(layer, params, x, key):
    """(path, child, child_params, child_input, child_key) in forward order, for combinators."""
    if isinstance(layer, Sequential):
        keys = [None] * len(layer.layers) if key is None else list(jax.random.split(key, len(layer.layers)))
        for i, (child, p, k) in enumerate(zip(layer.layers, params, keys)):
            yield f"[{i}]", child, p, x, k
            x = call_apply(child, p, x, k)
    elif isinstance(layer, Residual):
        yield ".block", layer.block, params, x, key


def _first_bad(model, params, x, key, path, tolerances):
    """One check_layer per layer, depth first: slow, but a backward that raises is just a failing layer."""
    for sub, child, p, child_x, k in _children(model, params, x, key):
        name, report = _first_bad(child, p, child_x, k, path + sub, tolerances)
        if name is not None:
            return name, report
    report = check_layer(model, params, x, key=key, **tolerances)
    if report.ok:
        return None, None
    return f"{path or 'model'} {describe(model)}", report


def _is_combinator(layer) -> bool:
    return isinstance(layer, (Sequential, Residual))


def _nodes(layer, path: str = ""):
    """(path, layer) for every layer, in post-order: children (in forward order) before their combinator."""
    if isinstance(layer, Sequential):
        for i, child in enumerate(layer.layers):
            yield from _nodes(child, f"{path}[{i}]")
    elif isinstance(layer, Residual):
        yield from _nodes(layer.block, path + ".block")
    yield path, layer


def _layer_pairs(model, params, x, key, seed: int, wanted: set[int]) -> dict:
    """Traced: {node index: (params, input, key, dy, jax.vjp's result, manual result)} for the wanted nodes."""
    results, count = {}, [0]

    def walk(layer, p, layer_x, k):
        for _, child, child_p, child_x, child_k in _children(layer, p, layer_x, k):
            walk(child, child_p, child_x, child_k)
        i = count[0]
        count[0] += 1
        if i in wanted:
            results[i] = (p, layer_x, k, *_layer_pair(layer, p, layer_x, k, _cotangent_key(seed, i)))

    walk(model, params, x, key)
    return results


def find_first_bad_layer(
    model,
    params,
    x,
    *,
    key=None,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_factor: float = NOISE_FACTOR,
    loss=None,
    y=None,
    seed: int = 0,
):
    """Depth-first, in forward order: the first layer whose backward disagrees with jax.vjp.

    Every layer is checked as ``check_layer`` does, on the input it sees in the
    model; children come before their combinator, so a combinator is blamed only
    when all its children pass but it fails as a whole (its own wiring is
    wrong). With ``loss`` and ``y``, the loss's backward is checked last, at
    the model's prediction. The plain layers (and the loss) run as one jit, the
    combinators before the first failing layer as a second; if some backward
    cannot even be traced, layer by layer.

    Returns:
      (name, LayerReport), e.g. ``("[2] Dense(3)", report)``, ``("[1].block[0] Dense(6)", report)``
      or ``("loss MSE()", report)``; (None, None) when every part agrees.
    """
    tolerances = {"rtol": rtol, "atol": atol, "noise_factor": noise_factor}
    nodes = list(_nodes(model))
    plain = {i for i, (_, layer) in enumerate(nodes) if not _is_combinator(layer)}

    def plain_layers(params, x, y):
        results = _layer_pairs(model, params, x, key, seed, plain)
        if loss is None:
            return results, None
        pred = call_apply(model, params, x, key)
        return results, (pred, jax.grad(lambda p: loss(p, y))(pred), loss.backward(loss.forward(pred, y)[1]))

    try:
        results, loss_results = jax.jit(plain_layers)(params, x, y)
        first_plain = next((i for i in sorted(plain) if not _report_of(nodes, results, i, tolerances).ok), len(nodes))
        combinators = {i for i, (_, layer) in enumerate(nodes) if _is_combinator(layer) and i < first_plain}
        if combinators:
            results.update(jax.jit(lambda p, x: _layer_pairs(model, p, x, key, seed, combinators))(params, x))
    except Exception:  # noqa: BLE001 - some backward cannot be traced: go layer by layer
        name, report = _first_bad(model, params, x, key, "", tolerances)
        if name is None and loss is not None:
            report = check_loss(loss, call_apply(model, params, x, key), y, **tolerances)
            return (f"loss {describe(loss)}", report) if not report.ok else (None, None)
        return name, report
    for i in sorted(results):
        report = _report_of(nodes, results, i, tolerances)
        if not report.ok:
            path, layer = nodes[i]
            return f"{path or 'model'} {describe(layer)}", report
    if loss_results is not None:
        pred, reference, manual = loss_results
        report = _loss_report(loss, pred, y, reference, manual, **tolerances)
        if not report.ok:
            return f"loss {describe(loss)}", report
    return None, None


def _report_of(nodes, results, i, tolerances) -> LayerReport:
    """The LayerReport of node i from its traced results (cached: the rounding-noise estimate compiles)."""
    cached = results[i]
    if isinstance(cached, LayerReport):
        return cached
    p, layer_x, k, dy, reference, manual = cached
    report = _layer_report(nodes[i][1], p, layer_x, k, dy, reference, manual, **tolerances)
    results[i] = report
    return report


# --- the whole model -------------------------------------------------------


def _directions(manual: dict, paths: list[str], shapes: list, directions: int, seed: int):
    """Unit directions per float leaf: along the manual gradient (if usable), then random."""
    rng = np.random.default_rng(seed)
    out = []
    for path, shape in zip(paths, shapes):
        g = manual.get(path)
        g = _numpy(g) if g is not None and np.shape(g) == tuple(shape) else None
        g_norm = float(np.linalg.norm(g)) if g is not None else 0.0
        dirs = [g / g_norm] if directions > 0 and g_norm > 0 and np.isfinite(g_norm) else []
        while len(dirs) < directions:
            v = rng.standard_normal(shape)
            dirs.append(v / np.linalg.norm(v))
        out.append((g, g_norm, dirs))
    return out


@dataclasses.dataclass(frozen=True)
class _Flat:
    """The float leaves of params as one float64 vector ``theta``, and the loss as a function of it."""

    model: Any
    loss: Any
    params: Any
    x: Any
    y: Any

    @functools.cached_property
    def leaves(self) -> list:
        return jax.tree_util.tree_leaves(self.params)

    @functools.cached_property
    def float_ix(self) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves) if _is_float(leaf)]

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        sizes = [int(np.size(self.leaves[i])) for i in self.float_ix]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    @functools.cached_property
    def theta0(self) -> np.ndarray:
        parts = [np.ravel(_numpy(self.leaves[i])) for i in self.float_ix]
        return np.concatenate(parts) if parts else np.zeros(0)

    def span(self, n: int) -> slice:
        return slice(self.offsets[n], self.offsets[n + 1])

    def inputs_at(self, theta, dtype):
        """(params with the float leaves taken from ``theta``, x, y), floats cast to ``dtype`` (under jit, x64)."""
        flat = [_numpy(leaf) if _is_float(leaf) else np.asarray(leaf) for leaf in self.leaves]
        for n, i in enumerate(self.float_ix):
            flat[i] = theta[self.span(n)].reshape(np.shape(self.leaves[i]))
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.params), flat)
        return _cast((params, *_to_float64((self.x, self.y))), dtype)

    def loss_at(self, theta, dtype):
        """The loss as a function of ``theta``, computed in ``dtype``."""
        params, x, y = self.inputs_at(theta, dtype)
        return self.loss(self.model.apply(params, x), y)

    def unflatten(self, theta):
        """A vector like theta0 back into a tree shaped like params (non-float leaves: zeros)."""
        flat = [np.zeros(np.shape(leaf)) for leaf in self.leaves]
        for n, i in enumerate(self.float_ix):
            flat[i] = theta[self.span(n)].reshape(np.shape(self.leaves[i]))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.params), flat)

    def float64_pass(self, leaf_dirs, noise_dtype: str | None = None, manual: bool = False):
        """One x64 jit: central differences in float64 along every direction, at every step of FD_STEPS,
        and, with ``noise_dtype``, the gradients of ``gradients`` (so one compile serves both).

        Returns (loss value, [per leaf: (directions, steps) difference quotients], per leaf: base
        steps, the result of ``gradients`` or None).
        """
        rows, steps, bases = [], [], []
        for n in range(len(self.float_ix)):
            h = 1e-6 * max(1.0, float(np.linalg.norm(self.theta0[self.span(n)])))
            bases.append(h)
            for v in leaf_dirs[n][2]:
                full = np.zeros_like(self.theta0)
                full[self.span(n)] = np.ravel(v)
                rows += [full] * len(FD_STEPS)
                steps += [h * multiple for multiple in FD_STEPS]
        directions = np.stack(rows) if rows else np.zeros((0, self.theta0.size))
        steps = np.asarray(steps, np.float64)

        def run(theta, directions, steps, params, x, y):
            def both_sides(row):
                d, s = row
                return jnp.stack([self.loss_at(theta + s * d, jnp.float64), self.loss_at(theta - s * d, jnp.float64)])

            sides = jax.lax.map(both_sides, (directions, steps))
            grads = None if noise_dtype is None else self._gradients(theta, params, x, y, noise_dtype, manual)
            return self.loss_at(theta, jnp.float64), sides, grads

        with jax.enable_x64(True):
            value, sides, grads = jax.jit(run)(self.theta0, directions, steps, self.params, self.x, self.y)
            value, sides = float(value), _numpy(sides)
            grads = None if grads is None else self._unpack(grads)
        quotients = (sides[:, 0] - sides[:, 1]) / (2 * steps) if steps.size else np.zeros(0)
        per_leaf, start = [], 0
        for n in range(len(self.float_ix)):
            count = len(leaf_dirs[n][2]) * len(FD_STEPS)
            per_leaf.append(quotients[start : start + count].reshape(-1, len(FD_STEPS)))
            start += count
        return value, per_leaf, bases, grads

    def _gradients(self, theta, params, x, y, dtype, manual: bool):
        """Traced: see ``gradients``; theta is float64 and cast here."""
        theta = theta.astype(dtype)
        reference = jax.grad(self.loss_at)(theta, dtype)
        if not manual:
            return reference, None, None
        by_hand = value_and_grad(self.model, self.loss, mode="manual")(*self.inputs_at(theta, dtype))[1]
        pred, cache = self.model.forward(params, x)
        _, loss_cache = self.loss.forward(pred, y)
        params, cache, loss_cache = _cast((params, cache, loss_cache), dtype)
        backward = self.model.backward(params, cache, self.loss.backward(loss_cache))[0]
        return reference, by_hand, backward

    def _unpack(self, grads):
        reference, by_hand, backward = grads
        return self.unflatten(_numpy(reference)), *jax.tree_util.tree_map(_numpy, (by_hand, backward))

    def gradients(self, dtype: str, manual: bool):
        """In ``dtype`` (float64, or the probe): jax.grad, and if asked, the manual gradient and the
        manual backward alone (from the forward pass and loss cache computed as given), as trees."""
        with jax.enable_x64(True):
            run = jax.jit(lambda *args: self._gradients(*args, dtype, manual))
            return self._unpack(run(self.theta0, self.params, self.x, self.y))


def _finite_difference_rows(value, per_leaf, bases, leaf_dirs, paths, shapes, noise, rtol, noise_factor, floors):
    rows = []
    for (g, g_norm, dirs), fd_values, h, path, shape in zip(leaf_dirs, per_leaf, bases, paths, shapes):
        if g is None:
            rows.append(_failed_row("finite-diff", path, shape, "no manual gradient of this shape"))
            continue
        analytic = np.array([np.vdot(g, v) for v in dirs])
        gaps = np.abs(fd_values - analytic[:, None])
        gaps = np.where(np.isnan(gaps), np.inf, gaps)
        best = np.argmin(gaps, axis=1)  # the step a kink spoiled least
        errs = gaps[np.arange(len(dirs)), best]
        fd = fd_values[np.arange(len(dirs)), best]
        noise_norm = noise.get(path, (0.0, 0.0))[1]
        fd_atol = 16 * np.finfo(np.float64).eps * (1.0 + abs(value)) / h
        allowed = fd_atol + max(rtol, FD_RTOL) * g_norm + noise_factor * noise_norm
        allowed = allowed + float(np.linalg.norm(floors.get(path, 0.0)))
        excess = errs / allowed
        worst = int(np.argmax(excess))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = float(errs.max() / g_norm) if g_norm > 0 else (0.0 if errs.max() == 0 else np.inf)
        rows.append(
            LeafCheck(
                "finite-diff",
                path,
                tuple(shape),
                float(errs.max()),
                rel,
                f"direction {worst}" + (" (along g)" if worst == 0 and g_norm > 0 else ""),
                _cosine(fd, analytic),
                bool(np.all(excess <= 1.0)),
                float(excess.max()),
            )
        )
    return rows


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
      rtol, atol, noise_factor: see the module docstring; rtol defaults by dtype
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
    dtype = precision_of(params, x)
    rtol = default_rtol(dtype) if rtol is None else rtol
    batched = per_example and jnp.ndim(x) >= 1 and jnp.ndim(y) >= 1
    manual_fn = value_and_grad(model, loss, mode="manual")
    autodiff_fn = value_and_grad(model, loss, mode="autodiff")
    stacked_fn = per_example_grads(model, loss, mode="manual")  # jax.vmap over single examples

    def averaged_fn(params, x, y):
        """Mean per-example gradient, and mean |per-example gradient| (the scale of the batch sum's rounding)."""
        stacked = stacked_fn(params, x, y)[1]
        mean = jax.tree_util.tree_map(lambda g: g.mean(axis=0), stacked)
        return mean, jax.tree_util.tree_map(lambda g: jnp.abs(g).mean(axis=0), stacked)

    raised = []
    try:
        manual, reference, averaged = jax.jit(
            lambda p, x, y: (manual_fn(p, x, y)[1], autodiff_fn(p, x, y)[1], averaged_fn(p, x, y) if batched else None)
        )(params, x, y)
    except Exception:  # noqa: BLE001 - one part raised; find which
        reference = jax.jit(autodiff_fn)(params, x, y)[1]  # a broken forward or bad inputs raise here, as they should
        manual, averaged = None, None
        try:
            manual = jax.jit(manual_fn)(params, x, y)[1]
        except Exception as error:  # noqa: BLE001 - a backward that raises is a failing row
            raised.append(_failed_row("manual", "<all>", (), _raised(error)))
        if batched:
            try:
                averaged = jax.jit(averaged_fn)(params, x, y)
            except Exception as error:  # noqa: BLE001
                raised.append(_failed_row("per-example", "<all>", (), _raised(error)))
    averaged, gross = averaged if averaged is not None else (None, None)
    # absolute floors, elementwise: the rounding of the sum over the batch, about log2(B) eps sum_j |g_j / B|
    # for a pairwise sum, which matters where that sum cancels to ~0; and the zero floor, eps times the
    # largest gradient element
    eps = float(jnp.finfo(dtype).eps)
    sum_depth = max(1.0, float(np.log2(jnp.shape(x)[0]))) if gross is not None else 0.0
    floors = {p: SUM_FACTOR * sum_depth * eps * _numpy(g) for p, g in _by_path(gross).items()}
    floor = noise_factor * _zero_floor(dtype, reference)
    float_leaves = {p: leaf for p, leaf in _by_path(params).items() if _is_float(leaf)}
    floors = {  # a misshapen manual gradient gets no batch floor: its own row fails on the shape
        p: (floors[p] if np.shape(floors.get(p)) == np.shape(leaf) else 0.0) + floor * np.ones(np.shape(leaf))
        for p, leaf in float_leaves.items()
    }
    flat = _Flat(model, loss, params, x, y)
    float_paths = list(float_leaves)
    shapes = [tuple(np.shape(leaf)) for leaf in float_leaves.values()]
    manual_by_path = _by_path(manual) if manual is not None else {}
    leaf_dirs = _directions(manual_by_path, float_paths, shapes, directions if finite_differences else 0, seed)
    value, quotients, bases = 0.0, None, []

    def witness_rows(noise, noise_to_truth):
        """noise: rounding between same-precision gradients; noise_to_truth: between dtype and float64."""
        allowance = {p: noise_factor * largest for p, (largest, _) in noise.items()}
        allowance = {p: allowance.get(p, 0.0) + floors.get(p, 0.0) for p in float_paths}
        rows = list(raised)
        if manual is not None:
            rows = compare_trees("autodiff", reference, manual, rtol, atol, noise=allowance) + rows
        if quotients is not None:
            rows += _finite_difference_rows(
                value,
                quotients,
                bases,
                leaf_dirs,
                float_paths,
                shapes,
                noise_to_truth,
                rtol,
                noise_factor,
                floors,
            )
        if averaged is not None and manual is not None:
            rows += compare_trees("per-example", manual, averaged, rtol, atol, noise=allowance)
        return rows

    # the rounding-noise estimate can only widen the tolerance: pay for it only when a row fails without it,
    # in the same compile as the finite differences when the same-precision rows already do
    noise_dtype = "float64" if dtype != "float64" else _PROBE
    math_only = _math_only(dtype) and manual is not None
    need_noise = noise_factor > 0 and not all(r.ok for r in witness_rows({}, {}))
    other = None
    if finite_differences:
        value, quotients, bases, other = flat.float64_pass(leaf_dirs, noise_dtype if need_noise else None, math_only)
    rows = witness_rows({}, {})
    if not all(r.ok for r in rows) and noise_factor > 0:
        other_reference, other_manual, other_backward = other or flat.gradients(noise_dtype, math_only)
        same = to_truth = _noise(reference, other_reference, dtype)
        if math_only:  # the manual backward's own rounding, and the whole manual gradient's (see _math_only)
            same = _larger(same, _noise(manual, other_backward, dtype))
            to_truth = _larger(to_truth, _noise(manual, other_manual, dtype))
        rows = witness_rows(_noise_scales(same), _noise_scales(to_truth))
    first_bad, layer_report = None, None
    if locate and not all(r.ok for r in rows):
        tolerances = {"rtol": rtol, "atol": atol, "noise_factor": noise_factor}
        first_bad, layer_report = find_first_bad_layer(model, params, x, loss=loss, y=y, seed=seed, **tolerances)
        if first_bad is None and batched and jnp.shape(x)[0] > 1:
            first_bad, layer_report = find_first_bad_layer(
                model, params, x[0], loss=loss, y=y[0], seed=seed, **tolerances
            )
            if first_bad is not None:
                first_bad += " (on one example, x[0])"
    return GradientReport(describe(model), rows, first_bad, layer_report, dtype, rtol)
