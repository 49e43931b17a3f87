"""What the checker returns: one row per (witness, leaf), a layer's verdict, the model's verdict."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class GradientCheckError(AssertionError):
    """Raised by ``raise_if_failed``; its message is the report's table."""


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """One leaf compared by one witness.

    Attributes:
      check: "autodiff", "finite-diff", "per-example", "vjp" or "manual" (the
        manual backward raised); for the hook witness, the hook's name
        ("per_example_sq_norms", "per_example_weighted_grads",
        "per_example_backward", or "call_per_example_backward": the fallback).
      path: the leaf, e.g. ``"[2]['W']"``; ``"dx"`` or ``"dpred"`` in layer reports; for a hook, the
        layer's path and the part, e.g. ``"[0] sq_norms"``, ``"[0] weighted['b']"``, ``"[1] dx"``.
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


def failed_row(check: str, path: str, shape, why: str) -> LeafCheck:
    """A row that fails without a comparison: ``why`` (missing, misshapen, raised) goes in "worst at"."""
    return LeafCheck(check, path, tuple(shape), np.inf, np.inf, why, float("nan"), False, np.inf)


def raised_row(check: str, path: str, shape, error: Exception) -> LeafCheck:
    """A failing row for a backward that raised: the error's first line, at most 120 characters."""
    text = f"raised {type(error).__name__}: {error}".splitlines()[0]
    return failed_row(check, path, shape, text if len(text) <= 120 else text[:117] + "...")


def table(rows: list[LeafCheck]) -> str:
    """The rows as aligned text, one line each, under a header line."""
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
        return f"{self.layer}: {'ok' if self.ok else 'FAILED'}\n{table(self.rows)}"

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
        when only the loss's backward is wrong; when every backward is right but
        a per-example hook is not, the first layer with a wrong hook; None when
        nothing failed or no single part is wrong on its own.
      layer_report: that layer's LayerReport (of its backward, or of its hook), or None.
      dtype: the precision the tolerances were chosen for.
      rtol: the relative tolerance used.
      first_bad_hook: ``"[0] Dense(5).per_example_sq_norms"``: the first layer (in
        post-order) and hook that disagree with jax.vmap of its own backward, or None.
      hook_layers: how many layers had their per-example hooks checked (0: not checked).
    """

    model: str
    rows: list[LeafCheck]
    first_bad_layer: str | None
    layer_report: LayerReport | None
    dtype: str
    rtol: float
    first_bad_hook: str | None = None
    hook_layers: int = 0

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
        text = f"{head}\n{table(self.rows)}"
        if not self.ok:
            where = self.first_bad_layer or "no single layer or loss disagrees with jax on its own"
            text += f"\nfirst wrong layer: {where}"
            if self.first_bad_hook is not None:
                text += f"\nfirst wrong hook: {self.first_bad_hook} (against jax.vmap of the layer's own backward)"
            if self.layer_report is not None:
                text += f"\n{self.layer_report}"
        return text

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise GradientCheckError(str(self))
