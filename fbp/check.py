"""The gradient checker: is the hand-written backward right, leaf by leaf?

Three independent witnesses:

1. ``autodiff``: the manual gradient against jax.grad of the same forward,
   element by element.
2. ``finite-diff``: directional derivatives of the loss, by central finite
   differences in float64, against <manual gradient, direction>. Independent of
   jax.grad: it catches a wrong forward-backward pair even where autodiff
   would agree with itself.
3. ``per-example``: the average of per-example manual gradients (jax.vmap over
   single examples) against the batch manual gradient.

When any fails, every layer is checked on its own (``check_layer``: its
backward against jax.vjp with a random cotangent, on the input it really sees
in the model) and the report names the first one, in forward order, that
disagrees.

Tolerance rule (``rtol`` defaults by the lowest float precision among params
and x: float64 1e-7, float32 1e-4, float16 2e-3, bfloat16 2e-2). For a leaf with
reference r and candidate c, element i passes when

    |c_i - r_i| <= atol + rtol * (|r_i| + rms(r)).

The rms term is the scale of the rounding noise: an element that nearly
cancels carries the noise of the terms that were summed into it, not of its
own small value. For a finite-difference direction v (unit norm) on a leaf
with manual gradient g, the check passes when

    |fd - <g, v>| <= fd_atol + max(rtol, 1e-6) * ||g||,

since |<g, v>| <= ||g|| and the float64 central difference with step
h = 1e-6 * max(1, ||leaf||) carries relative error ~1e-9 (truncation h^2,
rounding eps/h); ``fd_atol = 1e-9 * (1 + |L|)`` covers that rounding on the
loss value itself. Both bounds grow with size only through rms(r) and ||g||,
which grow as the leaf does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.grads import value_and_grad
from fbp.layers.base import call_apply, call_forward, describe
from fbp.layers.combinators import Residual, Sequential

DEFAULT_RTOL = {"float64": 1e-7, "float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}


class GradientCheckError(AssertionError):
    """Raised by ``raise_if_failed``; its message is the report's table."""


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """One leaf compared by one witness."""

    check: str  # "autodiff", "finite-diff", "per-example" or "vjp"
    path: str  # e.g. "[2]['W']", or "dx"
    shape: tuple
    max_abs_err: float
    max_rel_err: float  # |c - r| / (|r| + rms(r)) at its largest
    worst_index: Any  # element (or direction, for finite-diff) furthest out of tolerance
    cosine: float
    ok: bool


def _table(rows: list[LeafCheck]) -> str:
    header = ("check", "leaf", "shape", "max abs err", "max rel err", "worst at", "cosine", "")
    lines = [header] + [
        (
            r.check,
            r.path,
            str(r.shape),
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            str(r.worst_index),
            f"{r.cosine:.6f}",
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
      rows: one LeafCheck per (witness, leaf).
      first_bad_layer: ``"[2] Dense(10)"``-style name of the first layer whose own
        backward disagrees with jax.vjp, or None.
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

    def __str__(self) -> str:
        head = f"gradient check of {self.model} ({self.dtype}, rtol {self.rtol:g}): "
        head += "ok" if self.ok else f"FAILED ({len(self.failures)} of {len(self.rows)} rows)"
        text = f"{head}\n{_table(self.rows)}"
        if not self.ok:
            where = self.first_bad_layer or "no single layer disagrees with jax.vjp on its own"
            text += f"\nfirst wrong layer: {where}"
            if self.layer_report is not None:
                text += f"\n{self.layer_report}"
        return text

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise GradientCheckError(str(self))


# --- comparing trees -------------------------------------------------------


def _float_leaves(tree) -> list:
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]


def precision_of(*trees) -> str:
    """The lowest float precision among the trees' leaves, as a dtype name."""
    leaves = [leaf for tree in trees for leaf in _float_leaves(tree)]
    if not leaves:
        return "float32"
    return str(min((jnp.result_type(leaf) for leaf in leaves), key=lambda d: jnp.finfo(d).bits))


def compare_leaf(check: str, path: str, reference, candidate, rtol: float, atol: float = 0.0) -> LeafCheck:
    """Compare one leaf element by element under the rule in the module docstring."""
    r = np.asarray(reference, dtype=np.float64)
    shape = tuple(r.shape)
    if candidate is None or np.shape(candidate) != shape:
        got = None if candidate is None else np.shape(candidate)
        return LeafCheck(check, path, shape, np.inf, np.inf, f"shape {got}", float("nan"), False)
    c = np.asarray(candidate, dtype=np.float64)
    if r.size == 0:
        return LeafCheck(check, path, shape, 0.0, 0.0, "-", 1.0, True)
    err = np.abs(c - r)
    err = np.where(np.isnan(err), np.inf, err)
    scale = np.abs(r) + np.sqrt(np.mean(r * r))
    allowed = atol + rtol * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(err == 0, 0.0, err / scale)
        excess = np.where(err == 0, 0.0, err / np.where(allowed > 0, allowed, np.finfo(np.float64).tiny))
    worst = np.unravel_index(int(np.argmax(excess)), shape) if shape else ()
    norms = np.linalg.norm(c) * np.linalg.norm(r)
    cosine = float(np.vdot(c, r) / norms) if norms > 0 else (1.0 if not c.any() and not r.any() else 0.0)
    ok = bool(np.all(err <= allowed))
    return LeafCheck(check, path, shape, float(err.max()), float(rel.max()), tuple(int(i) for i in worst), cosine, ok)


def compare_trees(check: str, reference, candidate, rtol: float, atol: float = 0.0, prefix: str = "") -> list[LeafCheck]:
    """Compare two pytrees leaf by leaf; a structure mismatch is one failing row."""
    ref_paths, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    cand_paths, cand_def = jax.tree_util.tree_flatten_with_path(candidate)
    if ref_def != cand_def:
        return [LeafCheck(check, prefix or "<tree>", (), np.inf, np.inf, f"structure {cand_def} != {ref_def}", float("nan"), False)]
    return [
        compare_leaf(check, prefix + jax.tree_util.keystr(path), r, c, rtol, atol)
        for (path, r), (_, c) in zip(ref_paths, cand_paths)
    ]


# --- one layer -------------------------------------------------------------


def check_layer(layer, params, x, *, key=None, seed: int = 0, rtol: float | None = None, atol: float = 0.0) -> LayerReport:
    """Check one layer's backward against jax.vjp of its apply, with a random cotangent.

    Args:
      layer: any object with init/apply/forward/backward.
      params: its parameters.
      x: an input it accepts (with or without a batch axis).
      key: the layer's own PRNG key (Dropout); the same key is used for both sides.
      seed: seeds the random cotangent dy ~ N(0, 1), shaped like y.
      rtol, atol: the tolerance rule of this module; rtol defaults by dtype.

    Returns:
      A LayerReport with a row per dparams leaf and one for dx (skipped for
      integer inputs, whose dx must be None).
    """
    rtol = DEFAULT_RTOL[precision_of(params, x)] if rtol is None else rtol
    y, cache = call_forward(layer, params, x, key)
    dy = jax.random.normal(jax.random.PRNGKey(seed), jnp.shape(y), jnp.result_type(y))
    dparams, dx = layer.backward(params, cache, dy)
    differentiable_x = jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    if differentiable_x:
        _, vjp = jax.vjp(lambda p, x: call_apply(layer, p, x, key), params, x)
        ref_dparams, ref_dx = vjp(dy)
    else:
        _, vjp = jax.vjp(lambda p: call_apply(layer, p, x, key), params)
        (ref_dparams,) = vjp(dy)
    rows = compare_trees("vjp", ref_dparams, dparams, rtol, atol)
    if differentiable_x:
        rows.append(compare_leaf("vjp", "dx", ref_dx, dx, rtol, atol))
    elif dx is not None:
        rows.append(LeafCheck("vjp", "dx", tuple(jnp.shape(x)), np.inf, np.inf, "dx must be None for integer x", float("nan"), False))
    return LayerReport(describe(layer), rows)


def _children(layer, params, x, key):
    """(path, child, child_params, child_input, child_key) in forward order, for combinators."""
    if isinstance(layer, Sequential):
        keys = [None] * len(layer.layers) if key is None else list(jax.random.split(key, len(layer.layers)))
        for i, (child, p, k) in enumerate(zip(layer.layers, params, keys)):
            yield f"[{i}]", child, p, x, k
            x = call_apply(child, p, x, k)
    elif isinstance(layer, Residual):
        yield ".block", layer.block, params, x, key


def find_first_bad_layer(model, params, x, *, key=None, rtol=None, atol=0.0, path=""):
    """Depth-first, in forward order: the first layer whose backward disagrees with jax.vjp.

    Returns (name, LayerReport) or (None, None). A combinator is blamed only when
    all its children pass but it fails as a whole (its own wiring is wrong).
    """
    for sub, child, p, child_x, k in _children(model, params, x, key):
        name, report = find_first_bad_layer(child, p, child_x, key=k, rtol=rtol, atol=atol, path=path + sub)
        if name is not None:
            return name, report
    report = check_layer(model, params, x, key=key, rtol=rtol, atol=atol)
    if report.ok:
        return None, None
    return f"{path or 'model'} {describe(model)}".strip(), report


# --- the whole model -------------------------------------------------------


def _to_float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else jnp.asarray(a),
        tree,
    )


def _finite_difference_rows(model, loss, params, x, y, grads, *, directions, seed, rtol):
    """Central differences in float64 along the manual gradient and random directions, per leaf."""
    fd_rtol = max(rtol, 1e-6)
    rows = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    with jax.enable_x64(True):
        leaves64 = [jnp.asarray(leaf, jnp.float64) for _, leaf in paths]
        x64, y64 = _to_float64(x), _to_float64(y)
        loss_at = jax.jit(lambda leaves: loss(model.apply(treedef.unflatten(leaves), x64), y64))
        base = float(loss_at(leaves64))
        fd_atol = 1e-9 * (1.0 + abs(base))
        rng = np.random.default_rng(seed)
        for n, ((path, leaf), g) in enumerate(zip(paths, grad_leaves)):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) or np.size(leaf) == 0:
                continue
            g = np.asarray(g, np.float64)
            g_norm = float(np.linalg.norm(g))
            dirs = [g / g_norm] if g_norm > 0 else []
            while len(dirs) < directions:
                v = rng.standard_normal(g.shape)
                dirs.append(v / np.linalg.norm(v))
            h = 1e-6 * max(1.0, float(jnp.linalg.norm(leaves64[n])))
            errs, excess, estimates = [], [], []
            for v in dirs:
                plus = [a + h * v if i == n else a for i, a in enumerate(leaves64)]
                minus = [a - h * v if i == n else a for i, a in enumerate(leaves64)]
                fd = (float(loss_at(plus)) - float(loss_at(minus))) / (2 * h)
                analytic = float(np.vdot(g, v))
                err = abs(fd - analytic)
                err = np.inf if np.isnan(err) else err
                errs.append(err)
                excess.append(err / (fd_atol + fd_rtol * g_norm))
                estimates.append((fd, analytic))
            worst = int(np.argmax(excess))
            fds, analytics = np.array(estimates).T
            norms = np.linalg.norm(fds) * np.linalg.norm(analytics)
            cosine = float(np.vdot(fds, analytics) / norms) if norms > 0 else 1.0
            rows.append(
                LeafCheck(
                    "finite-diff",
                    jax.tree_util.keystr(path),
                    tuple(np.shape(leaf)),
                    float(max(errs)),
                    float(max(errs) / g_norm) if g_norm > 0 else float(max(errs) > 0) * np.inf,
                    f"direction {worst}" + (" (along g)" if worst == 0 and g_norm > 0 else ""),
                    cosine,
                    bool(max(excess) <= 1.0),
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
      rtol, atol: see the module docstring; rtol defaults by dtype.
      directions: finite-difference directions per leaf (the first is along the
        manual gradient itself, the rest random).
      seed: seeds the directions and the cotangents of the layer checks.
      finite_differences, per_example: turn a witness off (e.g. per_example for
        an unbatched x).
      locate: on failure, find the first layer that is wrong on its own.

    Returns:
      A GradientReport; ``report.ok``, ``str(report)``, ``report.raise_if_failed()``.
    """
    dtype = precision_of(params, x)
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    _, manual = jax.jit(value_and_grad(model, loss, mode="manual"))(params, x, y)
    _, reference = jax.jit(value_and_grad(model, loss, mode="autodiff"))(params, x, y)
    rows = compare_trees("autodiff", reference, manual, rtol, atol)
    if finite_differences:
        rows += _finite_difference_rows(model, loss, params, x, y, manual, directions=directions, seed=seed, rtol=rtol)
    if per_example and jnp.ndim(x) >= 1 and jnp.ndim(y) >= 1:
        _, averaged = jax.jit(value_and_grad(model, loss, mode="manual", per_example=True))(params, x, y)
        # averaging reorders a float sum over the batch: allow sqrt(batch) more rounding
        pe_rtol = rtol * max(1.0, float(np.sqrt(jnp.shape(x)[0])))
        rows += compare_trees("per-example", manual, averaged, pe_rtol, atol)
    first_bad, layer_report = None, None
    if locate and not all(r.ok for r in rows):
        first_bad, layer_report = find_first_bad_layer(model, params, x, rtol=rtol, atol=atol)
    return GradientReport(describe(model), rows, first_bad, layer_report, dtype, rtol)
