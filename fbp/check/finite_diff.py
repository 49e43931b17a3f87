"""The finite-difference witness: directional derivatives of the loss in float64, independent of jax.grad.

For each float leaf of params, a few unit directions v (the first along the
manual gradient g itself, the rest random) are differenced centrally in float64
(params and inputs cast up, inside ``jax.enable_x64``) and compared with
<g, v>. Each direction is differenced with every step of ``FD_STEPS`` and the
closest estimate counts: a ReLU or max-pool kink within a step of the point
spoils the longer steps only, while a wrong gradient disagrees with all of them.
The allowance is the finite-difference rule of ``fbp.check.tolerance``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.check.compare import as_float64, cast, cosine, float_leaves, is_float, to_float64
from fbp.check.report import LeafCheck, failed_row
from fbp.check.tolerance import FD_RTOL, Tolerance

FD_STEPS = (1.0, 0.1, 0.01)  # step multiples; the closest estimate counts (kinks)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss of ``model`` on the batch (x, y) as a function of params, in any precision.

    ``key`` is the model's PRNG key (None: inference mode). It is the same key in
    every precision, and fbp's random layers draw the same numbers from it in
    each (Dropout's mask depends on the key and the shape only), so the loss
    differenced in float64 is the very function checked in the dtype.
    """

    model: Any
    loss: Any
    x: Any
    y: Any
    key: Any = None

    def inputs(self, params, dtype):
        """(params, x, y) with their floats cast to ``dtype`` (under jit, x64)."""
        return cast((params, *to_float64((self.x, self.y))), dtype)

    def at(self, params, dtype):
        """The loss at ``params``, computed in ``dtype``."""
        params, x, y = self.inputs(params, dtype)
        return self.loss(self.model.apply(params, x, key=self.key), y)


@dataclasses.dataclass(frozen=True)
class Probe:
    """One float leaf of params and the unit directions it is differenced along.

    Attributes:
      path: the leaf's path, e.g. ``"[0]['W']"``.
      g: the manual gradient of this leaf as float64, or None (missing or misshapen).
      directions: ``(count, *shape)`` unit vectors; the first is g / ||g|| when g is usable.
      step: the base step h = 1e-6 max(1, ||leaf||).
    """

    path: str
    g: np.ndarray | None
    directions: np.ndarray
    step: float

    @property
    def shape(self) -> tuple:
        return tuple(self.directions.shape[1:])

    @property
    def g_norm(self) -> float:
        return float(np.linalg.norm(self.g)) if self.g is not None else 0.0


def probes(params, manual: dict[str, Any], count: int, seed: int) -> list[Probe]:
    """A Probe per float leaf of params, ``count`` directions each: along the manual gradient (if usable), then random.

    ``manual`` maps a path to the manual gradient's leaf.
    """
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in float_leaves(params).items():
        shape = tuple(np.shape(leaf))
        g = manual.get(path)
        g = as_float64(g) if g is not None and np.shape(g) == shape else None
        g_norm = float(np.linalg.norm(g)) if g is not None else 0.0
        directions = [g / g_norm] if count > 0 and g_norm > 0 and np.isfinite(g_norm) else []
        while len(directions) < count:
            v = rng.standard_normal(shape)
            directions.append(v / np.linalg.norm(v))
        step = 1e-6 * max(1.0, float(np.linalg.norm(as_float64(leaf))))
        out.append(Probe(path, g, np.reshape(np.asarray(directions), (count, *shape)), step))
    return out


@dataclasses.dataclass(frozen=True)
class FiniteDifferences:
    """Central difference quotients of the loss along every probe's directions.

    Attributes:
      value: the float64 loss at the point.
      probes: the leaves and their directions.
      quotients: per probe, ``(directions, len(FD_STEPS))`` difference quotients.
    """

    value: float
    probes: list[Probe]
    quotients: list[np.ndarray]

    def rows(self, tol: Tolerance, noise: dict[str, np.ndarray], floors: dict[str, np.ndarray]) -> list[LeafCheck]:
        """A "finite-diff" row per probe: the closest step's |fd - <g, v>| against its allowance.

        ``noise``: by path, the elementwise rounding of the gradient against float64;
        ``floors``: by path, the elementwise absolute allowance every witness grants.
        """
        return [
            self._row(probe, quotients, tol, noise, floors) for probe, quotients in zip(self.probes, self.quotients)
        ]

    def _row(self, probe: Probe, quotients, tol: Tolerance, noise, floors) -> LeafCheck:
        if probe.g is None:
            return failed_row("finite-diff", probe.path, probe.shape, "no manual gradient of this shape")
        analytic = np.array([np.vdot(probe.g, v) for v in probe.directions])
        gaps = np.abs(quotients - analytic[:, None])
        gaps = np.where(np.isnan(gaps), np.inf, gaps)
        rows = np.arange(len(probe.directions))
        best = np.argmin(gaps, axis=1)  # the step a kink spoiled least
        errs, fd = gaps[rows, best], quotients[rows, best]
        fd_atol = 16 * np.finfo(np.float64).eps * (1.0 + abs(self.value)) / probe.step
        allowed = fd_atol + max(tol.rtol, FD_RTOL) * probe.g_norm
        allowed += tol.noise_factor * float(np.linalg.norm(noise.get(probe.path, 0.0)))
        allowed += float(np.linalg.norm(floors.get(probe.path, 0.0)))
        excess = errs / allowed
        worst = int(np.argmax(excess))
        g_norm = probe.g_norm
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = float(errs.max() / g_norm) if g_norm > 0 else (0.0 if errs.max() == 0 else np.inf)
        return LeafCheck(
            "finite-diff",
            probe.path,
            probe.shape,
            float(errs.max()),
            rel,
            f"direction {worst}" + (" (along g)" if worst == 0 and g_norm > 0 else ""),
            cosine(fd, analytic),
            bool(np.all(excess <= 1.0)),
            float(excess.max()),
        )


def _blocks(leaf_probes: list[Probe]) -> list[np.ndarray]:
    """Per float leaf, ``(rows, *shape)``: row r is direction r where it belongs to this leaf, else zero.

    Ravelling row r of every leaf together gives direction r as a vector like theta.
    """
    total = sum(len(probe.directions) for probe in leaf_probes)
    blocks, start = [], 0
    for probe in leaf_probes:
        block = np.zeros((total, *probe.shape))
        block[start : start + len(probe.directions)] = probe.directions
        blocks.append(block)
        start += len(probe.directions)
    return blocks


def _sides(objective: Objective, params, blocks: list, steps):
    """Traced, in float64: the loss at theta + s v and theta - s v for every direction v and step s.

    theta is the float leaves of params ravelled into one vector
    (``jax.flatten_util.ravel_pytree``); ``blocks`` are the directions
    (``_blocks``), ``steps`` their steps, ``(directions, len(FD_STEPS))``. Returns
    the loss at theta and ``(directions, len(FD_STEPS), 2)``.
    """
    flat, treedef = jax.tree_util.tree_flatten(params)
    theta, unravel = ravel_pytree([a.astype(jnp.float64) for a in flat if is_float(a)])

    def loss_at(theta):
        given = iter(unravel(theta))
        return objective.at(treedef.unflatten([next(given) if is_float(a) else a for a in flat]), jnp.float64)

    def both_sides(row):
        v, s = row
        return jnp.stack([loss_at(theta + s * v), loss_at(theta - s * v)])

    if steps.shape[0] == 0:
        return loss_at(theta), jnp.zeros((*steps.shape, 2), theta.dtype)
    rows = jax.vmap(lambda leaves: ravel_pytree(leaves)[0])(blocks)
    sides = jax.lax.map(both_sides, (jnp.repeat(rows, len(FD_STEPS), axis=0), jnp.ravel(steps)))
    return loss_at(theta), sides.reshape(*steps.shape, 2)


def central_differences(objective: Objective, params, leaf_probes: list[Probe], extra: Callable | None = None):
    """One x64 jit: the loss differenced in float64 along every probe direction at every step of FD_STEPS.

    ``extra(params, x, y)``, if given, is traced into the same program (so one
    compile serves both) and its result returned alongside, as float64 numpy.

    Returns:
      (FiniteDifferences, the result of ``extra`` or None).
    """
    steps = np.array([[probe.step * m for m in FD_STEPS] for probe in leaf_probes for _ in probe.directions])
    steps = steps.reshape(-1, len(FD_STEPS))

    def run(params, blocks, steps, x, y):
        value, sides = _sides(objective, params, blocks, steps)
        return value, sides, None if extra is None else extra(params, x, y)

    with jax.enable_x64(True):
        value, sides, more = jax.jit(run)(params, _blocks(leaf_probes), steps, objective.x, objective.y)
        value, sides, more = float(value), as_float64(sides), jax.tree_util.tree_map(as_float64, more)
    quotients = (sides[..., 0] - sides[..., 1]) / (2 * steps)
    per_probe = np.split(quotients, np.cumsum([len(probe.directions) for probe in leaf_probes])[:-1])
    return FiniteDifferences(value, leaf_probes, per_probe), more
