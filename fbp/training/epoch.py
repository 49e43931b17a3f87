"""An epoch of train steps: one compiled ``lax.scan`` or a loop of the jitted step, whichever is faster.

``train_epoch`` runs the epoch as one compiled ``lax.scan`` or as a Python loop
of the jitted step (asynchronous dispatch), whichever is faster for the model
and backend (``epoch_strategy``); its results are bit-identical to calling the
step on each batch in turn.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fbp import parallel
from fbp.training.step import TrainState, TrainStep

EPOCH_STRATEGIES = ("auto", "scan", "loop")


@jax.jit
def _unstack(*stacks):
    """Every batch of a stack as its own array, in one dispatch: the loop then calls the very program that
    ``step(state, x, y)`` runs, so its results are bit-identical to calling the step by hand."""
    return tuple(list(stack) for stack in stacks)


@jax.jit
def _stack_metrics(metrics: list[dict]) -> dict:
    return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *metrics)


_copy_tree = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


def epoch_strategy(step: TrainStep, state: TrainState, xs, ys) -> str:
    """How ``train_epoch(step, state, xs, ys)`` runs by default: ``"scan"`` or ``"loop"``, decided once per
    input signature and kept on the step.

    On CPU a rule decides, from measurements (benchmarks/RESULTS.md): a model
    with a convolution runs as a loop of jitted steps, since XLA:CPU runs
    convolution gradients inside a while loop several times slower than at the
    top level (jax-ml/jax#12868: the 28x28 CNN at batch 128 took 24x the loop's
    time per step, the 8x8 digits CNN 3.5x); any other model runs as one scan,
    which saves the per-step dispatch (0.6x the loop's time on the 64-128-128-10
    MLP at batch 32). On other backends (where a while loop may sync with the
    host every iteration, jax-ml/jax#2491) both run once on a copy of the state
    after compiling, and the faster is kept.
    """
    key = _epoch_signature(state, xs, ys)
    if key not in step.strategies:
        if _platform(step) == "cpu":
            chosen = "loop" if _has_convolution(step, state, xs, ys) else "scan"
        else:
            chosen = measure_strategies(step, state, xs, ys)
        step.strategies[key] = chosen
    return step.strategies[key]


def _epoch_signature(state, xs, ys):
    leaves, treedef = jax.tree_util.tree_flatten((state, xs, ys))
    return treedef, tuple((getattr(leaf, "shape", None), getattr(leaf, "dtype", type(leaf))) for leaf in leaves)


def _has_convolution(step: TrainStep, state: TrainState, xs, ys) -> bool:
    """Whether the model's forward pass holds a convolution (read from a trace of ``apply`` on shapes alone)."""
    abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    params = jax.tree_util.tree_map(abstract, state.params)
    x = jax.ShapeDtypeStruct(jnp.shape(xs)[1:], jnp.result_type(xs))
    jaxpr = jax.make_jaxpr(lambda p, x: step.model.apply(p, x))(params, x).jaxpr
    return _holds_primitive(jaxpr, "conv_general_dilated")


def _holds_primitive(jaxpr, name: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns") and _holds_primitive(inner, name):
                    return True
    return False


def measure_strategies(step: TrainStep, state: TrainState, xs, ys) -> str:
    """Time one epoch of each strategy on copies of ``state`` (after a first, compiling run); the faster."""
    times = {}
    for strategy in ("loop", "scan"):
        for _ in range(2):  # the first run compiles
            start = time.perf_counter()
            jax.block_until_ready(_epoch_by(step, strategy, _copy_tree(state), xs, ys))
            times[strategy] = time.perf_counter() - start
    return min(times, key=times.get)


def _platform(step: TrainStep) -> str:
    return next(iter(step.mesh.devices.flat if step.mesh is not None else jax.devices())).platform


def _epoch_by(step: TrainStep, strategy: str, state: TrainState, xs, ys, masks=None):
    if strategy == "scan":
        return step.scan(state, xs, ys, masks)
    # On one CPU device the batches are numpy views of the stack and the metrics are stacked on the host: the
    # step's own program runs on them as on device arrays, and nothing else compiles (a slicing or stacking
    # program costs about as much to compile as a short epoch of a small model costs to run).
    host = step.mesh is None and _platform(step) == "cpu"
    if masks is None:
        batches = zip(np.asarray(xs), np.asarray(ys)) if host else zip(*_unstack(xs, ys))
    else:
        batches = zip(np.asarray(xs), np.asarray(ys), np.asarray(masks)) if host else zip(*_unstack(xs, ys, masks))
    jitted = step.compiled(masked=masks is not None)
    # one step in flight on forced CPU devices with all-reduces, as parallel.place does for a step
    wait = step.mesh is not None and step.mesh.size > 1 and _platform(step) == "cpu"
    metrics = []
    for batch in batches:
        state, step_metrics = jitted(state, *batch)
        metrics.append(step_metrics)
        if wait:
            jax.block_until_ready(state)
    if host:
        stacked = jax.tree_util.tree_map(lambda *values: np.stack(values), *jax.device_get(metrics))
        return state, jax.tree_util.tree_map(jnp.asarray, stacked)
    return state, _stack_metrics(metrics)


def train_epoch(step: TrainStep, state: TrainState, xs, ys, *, masks=None, strategy: str = "auto"):
    """Run a whole epoch of batches: every step compiled once, the metrics stacked.

    Args:
      step: from ``make_train_step``.
      state: the TrainState.
      xs: ``(num_batches, batch, ...)`` device-resident inputs.
      ys: ``(num_batches, batch, ...)`` targets.
      masks: ``(num_batches, batch)`` bool, True for the real examples of padded
        batches (``fbp.data.poisson_batches``), or None (every example is real).
      strategy: ``"scan"`` (one compiled ``lax.scan`` over the batches),
        ``"loop"`` (a Python loop of the jitted step, dispatched
        asynchronously: no host sync until the metrics are read), or
        ``"auto"`` (default): the one ``epoch_strategy`` picks for this model
        and backend. The loop runs the very program ``step(state, x, y)`` runs,
        so its results are bit-identical to calling ``step`` on each batch in
        turn; so are the scan's wherever XLA compiles the step alike inside a
        while loop (tested for MLPs on CPU; not XLA:CPU's convolution
        gradients, which "auto" runs as a loop).

    Returns:
      (state, metrics) with every metric stacked over batches: ``(num_batches,)``.
    """
    if not isinstance(step, TrainStep):
        raise TypeError(f"train_epoch: expected the TrainStep from make_train_step, got {type(step).__name__}")
    if strategy not in EPOCH_STRATEGIES:
        raise ValueError(f"train_epoch: strategy must be one of {EPOCH_STRATEGIES}, got {strategy!r}")
    xs_shape, ys_shape = jnp.shape(xs), jnp.shape(ys)
    if len(xs_shape) < 2 or len(ys_shape) < 2 or xs_shape[:2] != ys_shape[:2]:
        raise ValueError(
            f"train_epoch: expected xs (num_batches, batch, ...) and ys with the same two leading axes, "
            f"got {xs_shape} and {ys_shape}"
        )
    if xs_shape[0] == 0:
        raise ValueError(f"train_epoch: no batches (xs has shape {xs_shape})")
    if masks is not None and tuple(jnp.shape(masks)) != tuple(xs_shape[:2]):
        raise ValueError(
            f"train_epoch: masks must have shape (num_batches, batch) = {tuple(xs_shape[:2])}, "
            f"got {tuple(jnp.shape(masks))}"
        )
    if step.mesh is not None:
        state, xs, ys = parallel.place(step.mesh, state, xs, ys, batch_axis=1)
        masks = None if masks is None else parallel.shard_batch(step.mesh, masks, 1)
    if strategy == "auto":
        strategy = epoch_strategy(step, state, xs, ys)
    return _epoch_by(step, strategy, state, xs, ys, masks)
