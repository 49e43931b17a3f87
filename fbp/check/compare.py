"""Leaf comparison: a candidate gradient against a reference, element by element, matched by path."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.report import LeafCheck, failed_row


def is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def by_path(tree) -> dict[str, Any]:
    """{keystr path: leaf}; None leaves (no gradient) are simply absent."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def float_leaves(tree) -> dict[str, Any]:
    """{keystr path: leaf} for the floating-point leaves only: what has a gradient."""
    return {path: leaf for path, leaf in by_path(tree).items() if is_float(leaf)}


def as_float64(leaf) -> np.ndarray:
    return np.asarray(leaf, dtype=np.float64)


def cast(tree, dtype):
    """Float leaves to ``dtype`` (under jit); integer leaves (labels, ids) unchanged."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_float(a) else a, tree)


def to_float64(tree):
    """Float leaves as float64 numpy arrays, others as numpy arrays: safe to pass into an x64 jit."""
    return jax.tree_util.tree_map(lambda a: as_float64(a) if is_float(a) else np.asarray(a), tree)


def cosine(c: np.ndarray, r: np.ndarray) -> float:
    norms = np.linalg.norm(c) * np.linalg.norm(r)
    if norms > 0:
        return float(np.vdot(c, r) / norms)
    return 1.0 if not c.any() and not r.any() else 0.0


def compare_leaf(
    check: str, path: str, reference, candidate, rtol: float, atol: float = 0.0, noise: float = 0.0
) -> LeafCheck:
    """Compare one leaf element by element: |c - r| <= atol + noise + rtol (|r| + rms(r)).

    ``noise`` is the absolute allowance for measured rounding, already scaled
    (``noise_factor * max noise`` under the rule of ``fbp.check.tolerance``);
    a scalar or an array shaped like the leaf.
    """
    r = as_float64(reference)
    shape = tuple(r.shape)
    if candidate is None:
        return failed_row(check, path, shape, "missing")
    if np.shape(candidate) != shape:
        return failed_row(check, path, shape, f"shape {tuple(np.shape(candidate))}")
    c = as_float64(candidate)
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
        cosine(c, r),
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
    ref, cand = by_path(reference), by_path(candidate)
    rows = [compare_leaf(check, prefix + p, r, cand.get(p), rtol, atol, noise.get(p, 0.0)) for p, r in ref.items()]
    rows += [failed_row(check, prefix + p, np.shape(c), "not a parameter") for p, c in cand.items() if p not in ref]
    return rows
