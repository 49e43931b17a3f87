"""The training loop behind ``fbp train``: data, model, epochs, metrics, checkpoints, faults.

    result = fbp.fit(fbp.TrainConfig(data="digits", model="mlp:256,256", epochs=40))
    result.history[-1]["test_accuracy"]        # about 0.98

Each epoch: the training set in an order drawn from ``(seed, epoch)`` (so a
resumed run sees the same batches as an uninterrupted one), cut into full
batches and run through ``fbp.train_epoch`` (one lax.scan, or a loop of the
jitted step for a model with convolutions on CPU: ``epoch_strategy``) in about ten
chunks, for a live progress bar; then the test set is evaluated, a line goes
to ``metrics.jsonl`` and the state is checkpointed (``fbp.training.checkpoint``).

Faults: NaN/Inf in the data is refused before training. A non-finite loss or
gradient during training either stops the run (``on_nonfinite="stop"``,
raising NonFiniteError that names the step and the first bad leaf; nothing
more is saved, so the last checkpoint is the last good state) or skips that
update and counts it (``"skip"``). A retrace of the compiled step after the
first epoch (a new input shape or dtype) warns with RetraceWarning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbp import data, models
from fbp.check import GradientCheckError, check_gradients
from fbp.grads import GRAD_MODES
from fbp.layers.base import uses_key
from fbp.losses import MSE, SoftmaxCrossEntropy
from fbp.training import checkpoint
from fbp.training import log as run_log
from fbp.training.step import (
    PRECISIONS,
    TrainState,
    TrainStep,
    evaluate,
    make_train_step,
    train_epoch,
    value_and_grad_with_policy,
)

OPTIMIZERS = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": optax.adam,
    "adamw": lambda lr: optax.adamw(lr, weight_decay=1e-4),
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.02, "adam": 1e-3, "adamw": 1e-3}
# options that may change between a run and its --resume without changing the result
_RESUMABLE_CHANGES = {"epochs", "resume", "quiet", "out", "check_gradients", "on_nonfinite", "keep_checkpoints"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``fit`` needs; ``fbp train``'s options map onto these fields one to one.

    Attributes:
      data: one of ``fbp.data.DATASETS``, or ``text:PATH``; data_dir: the IDX folder for mnist / fashion-mnist.
      model: a model spec, e.g. ``"mlp[:W1,...]"``, ``"lstm:64"``, ``"transformer"`` (``fbp.models``).
      optimizer: ``sgd``, ``momentum`` (0.9), ``adam`` or ``adamw`` (weight decay 1e-4).
      lr: learning rate; None for the optimizer's default (``DEFAULT_LR``).
      epochs: total epochs (a resumed run continues up to this number).
      batch_size: examples per step; the last partial batch of an epoch is dropped.
      grad, per_example, clip_norm, noise_multiplier: as in ``fbp.make_train_step``.
      seed: seeds the initial parameters, the data order and the synthetic data.
      out: output folder; None for ``runs/<data>-<model>-seed<seed>``.
      resume: continue from the last complete checkpoint in ``out``.
      check_gradients: run ``fbp.check_gradients`` on the first batch first; abort on failure.
      devices: data-parallel over this many devices (``fbp.parallel``); None for one.
      on_nonfinite: ``"stop"`` or ``"skip"`` on a NaN/Inf loss or gradient.
      quiet: print nothing but errors (no progress bar).
      keep_checkpoints: how many of the newest checkpoints to keep.
      chunks_per_epoch: the epoch runs as this many ``train_epoch`` calls, to update the progress bar.
      precision: ``float32``, or ``bfloat16`` / ``float16`` for mixed precision (float32 params and
        optimizer state; forward, backward and caches in the low dtype): ``fbp.make_train_step(precision=)``.
    """

    data: str = "digits"
    data_dir: str | None = None
    model: str = "mlp:256,256"
    optimizer: str = "adam"
    lr: float | None = None
    epochs: int = 40
    batch_size: int = 32
    grad: str = "manual"
    per_example: bool = False
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    seed: int = 0
    out: str | None = None
    resume: bool = False
    check_gradients: bool = False
    devices: int | None = None
    on_nonfinite: str = "stop"
    quiet: bool = False
    keep_checkpoints: int = 3
    chunks_per_epoch: int = 10
    precision: str = "float32"

    def __post_init__(self):
        if self.out is not None:  # absolute once, here: orbax refuses relative paths, and cwd may change
            object.__setattr__(self, "out", os.path.abspath(os.fspath(self.out)))

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        data.check_name(self.data)  # one of data.DATASETS, or text:PATH
        choices = {"optimizer": tuple(OPTIMIZERS), "grad": GRAD_MODES, "on_nonfinite": ("stop", "skip"),
                   "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "keep_checkpoints", "chunks_per_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.clip_norm is not None and not self.per_example:
            raise ValueError("clip_norm clips each example's gradient: it needs per_example (--per-example)")
        if self.noise_multiplier is not None and self.clip_norm is None:
            raise ValueError("noise_multiplier scales noise by clip_norm: it needs clip_norm (--clip-norm)")
        if self.devices is not None and (self.devices < 1 or self.batch_size % self.devices):
            raise ValueError(f"devices must be >= 1 and divide batch_size {self.batch_size}, got {self.devices}")
        models.parse(self.model)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def out_dir(self) -> Path:
        """The output folder, absolute: ``out``, or ``runs/<data>-<model>-seed<seed>`` under the working directory."""
        if self.out is not None:
            return Path(self.out)
        spec = self.model.replace(":", "-").replace(",", "-")
        return Path(os.path.abspath(Path("runs") / f"{data.run_name(self.data)}-{spec}-seed{self.seed}"))


class TrainResult(NamedTuple):
    """What ``fit`` returns: the final state, the model, one metrics dict per epoch, the output folder."""

    state: TrainState
    model: Any
    history: list[dict]
    out_dir: Path


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

        def counted(state, x, y):
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
            return step.pure(state, x, y)

        self.step = dataclasses.replace(step, pure=counted)

    def arm(self) -> None:
        """Every trace from now on warns."""
        self._armed = True


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """``sgd``, ``momentum``, ``adam`` or ``adamw`` at learning rate ``lr``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](lr)


def first_nonfinite(value, grads) -> str | None:
    """``"loss"`` if ``value`` is NaN/Inf, else the path of the first gradient leaf holding one
    (e.g. ``"[2]['W']"``), else None."""
    if not np.all(np.isfinite(np.asarray(value))):
        return "loss"
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            return jax.tree_util.keystr(path)
    return None


def _make_step(model, loss, optimizer, config: TrainConfig) -> TrainStep:
    options = {"grad": config.grad, "per_example": config.per_example, "clip_norm": config.clip_norm,
               "noise_multiplier": config.noise_multiplier, "precision": config.precision}
    if config.devices is None:
        return make_train_step(model, loss, optimizer, **options)
    try:
        from fbp import parallel
    except ImportError as error:
        raise ValueError(f"--devices needs fbp.parallel (data parallelism), which cannot be imported: {error}") from error
    return make_train_step(model, loss, optimizer, mesh=parallel.make_mesh(config.devices), **options)


_copy = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


def _diagnose(step: TrainStep, loss, config: TrainConfig, state, xs, ys, index: int) -> str:
    """Replay a chunk up to its first non-finite batch and name the first bad leaf of that batch's gradient."""
    model = step.model
    for j in range(index):
        state, _ = step(state, xs[j], ys[j])
    key = state.rng if uses_key(model, state.params, xs[index], state.rng) else None
    # the gradient as the step computes it: under its precision policy (casts, loss scale)
    value, grads = value_and_grad_with_policy(model, loss, step.policy, grad=config.grad,
                                              per_example=config.per_example)(state.params, xs[index], ys[index], key)
    leaf = first_nonfinite(value, grads)
    if leaf is None:
        return "update (the clipped or noised gradient)"
    return "loss" if leaf == "loss" else f"gradient in {leaf}"


def _resume(config: TrainConfig, state: TrainState) -> tuple[TrainState, int, list[dict]]:
    """Restore the last complete checkpoint of ``config.out_dir``: (state, its epoch, metrics up to it)."""
    checkpoints = config.out_dir / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint folder {checkpoints}; run once without --resume first")
    path = checkpoint.latest(checkpoints)
    if path is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoints}")
    state, meta = checkpoint.restore(path, state)
    saved = meta["metadata"].get("config", {})
    changed = [f"{name} {saved[name]!r} -> {value!r}" for name, value in dataclasses.asdict(config).items()
               if name in saved and name not in _RESUMABLE_CHANGES and saved[name] != value]
    if changed:
        warnings.warn(f"--resume: options differ from the run that wrote {path}: {', '.join(changed)}", stacklevel=3)
    history = run_log.read_history(config.out_dir / "metrics.jsonl", meta["epoch"])
    return jax.tree_util.tree_map(jnp.asarray, state), meta["epoch"], history


def _clear_checkpoints(folder: Path) -> None:
    """Delete an earlier run's checkpoints, refusing a folder that holds anything else."""
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not checkpoint.is_checkpoint_folder_entry(p.name))
    if foreign:
        raise ValueError(f"{folder} holds files that are not fbp checkpoints ({', '.join(foreign[:3])}); "
                         "choose another --out")
    shutil.rmtree(folder)


def _run_epoch(guard: RetraceGuard, state, batches: data.Batches, chunk: int, context: dict, say: run_log.Progress):
    """One epoch as ``train_epoch`` calls of ``chunk`` steps each, in the strategy it picks for the model and
    backend (a scan, or a loop of the jitted step). Returns (state, finite training losses, skipped updates)."""
    config, epoch = context["config"], context["epoch"]
    num_batches = batches.xs.shape[0]
    losses, skipped = [], 0
    for start in range(0, num_batches, chunk):
        xs, ys = batches.xs[start : start + chunk], batches.ys[start : start + chunk]
        before = _copy(state) if config.on_nonfinite == "stop" else None  # the step donates `state`
        state, metrics = train_epoch(guard.step, state, xs, ys)
        finite = np.asarray(metrics["finite"])
        if not finite.all() and config.on_nonfinite == "stop":
            index = int(np.argmin(finite))
            what = _diagnose(context["step"], context["loss"], config, before, xs, ys, index)
            last = checkpoint.latest(config.out_dir / "checkpoints")
            raise NonFiniteError(
                f"non-finite {what} at step {(epoch - 1) * num_batches + start + index + 1} (epoch {epoch}, "
                f"batch {start + index + 1} of {num_batches}); stopped without saving. The last good "
                f"checkpoint is {last if last else 'none (no epoch completed)'}. Lower --lr, clip with "
                "--per-example --clip-norm, or skip such batches with --on-nonfinite skip."
            )
        skipped += int((~finite).sum())
        losses += list(np.asarray(metrics["loss"])[finite])
        say.update(len(finite), float(np.mean(losses)) if losses else float("nan"))
    return state, losses, skipped


def fit(config: TrainConfig, dataset: data.Dataset | None = None, *, log: Callable[[str], None] | None = None
        ) -> TrainResult:
    """Train as ``fbp train`` does and write its outputs to ``config.out_dir``.

    Args:
      config: the options.
      dataset: train on this instead of ``data.load(config.data)``.
      log: where progress messages go (default: stdout, or above the progress bar).

    Returns:
      A TrainResult.

    Raises:
      ValueError: a bad option, or NaN/Inf in the data.
      FileNotFoundError / fbp.training.checkpoint.CheckpointError: ``resume`` without a usable checkpoint.
      GradientCheckError: ``check_gradients`` found a wrong gradient.
      NonFiniteError: a NaN/Inf loss or gradient with ``on_nonfinite="stop"``.
    """
    config.validate()
    dataset = dataset if dataset is not None else data.load(config.data, data_dir=config.data_dir, seed=config.seed)
    data.check_finite(dataset)
    num_batches = dataset.x_train.shape[0] // config.batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {dataset.x_train.shape[0]} training examples")
    classification = dataset.num_classes is not None
    loss = SoftmaxCrossEntropy() if classification else MSE()
    model = models.build_for(config.model, dataset)  # a prediction per step when the labels are per step
    init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = jax.jit(model.init)(init_key, jnp.asarray(dataset.x_train[:1]))  # jit: one compile, not one per op
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    state = TrainState.create(params, optimizer, rng=rng)
    step = _make_step(model, loss, optimizer, config)

    out = config.out_dir
    start_epoch, history = 0, []
    if config.resume:
        state, start_epoch, history = _resume(config, state)
    else:
        _clear_checkpoints(out / "checkpoints")  # a fresh run replaces an earlier one's
    out.mkdir(parents=True, exist_ok=True)
    if dataset.vocabulary is not None:  # text: fbp generate needs the characters back
        data.save_vocabulary(out, dataset)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    run_log.write_history(out / "metrics.jsonl", history)
    # equal chunks (the largest divisor of num_batches up to chunks_per_epoch), so that one compile of the
    # scan serves them all (the loop strategy compiles the step alone)
    num_chunks = max(d for d in range(1, min(config.chunks_per_epoch, num_batches) + 1) if num_batches % d == 0)
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    guard = RetraceGuard(step)
    # evaluate's accuracy counts per example; labels per step (text, copy) report loss only
    metric_names = ("loss", "accuracy") if classification else ("loss",)
    say = run_log.Progress(max(0, config.epochs - start_epoch) * num_batches, config.quiet)
    say_line = log or say.write
    try:
        if start_epoch >= config.epochs:
            say_line(f"already at epoch {start_epoch} of {config.epochs}: nothing to do "
                     f"(raise --epochs to train further; outputs in {out})")
        elif start_epoch:
            say_line(f"resumed from {checkpoint.latest(out / 'checkpoints')} (epoch {start_epoch})")
        if config.check_gradients and start_epoch < config.epochs:
            key = data.epoch_key(config.seed, start_epoch + 1)
            first = data.batches(x_train, y_train, config.batch_size, key=key)
            report = check_gradients(model, loss, state.params, first.xs[0], first.ys[0], seed=config.seed)
            say_line(str(report))
            if not report.ok:
                raise GradientCheckError(f"--check-gradients: the gradient check failed on the first batch\n{report}")
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            batches = data.batches(x_train, y_train, config.batch_size, key=data.epoch_key(config.seed, epoch))
            context = {"config": config, "epoch": epoch, "step": step, "loss": loss}
            state, losses, skipped = _run_epoch(guard, state, batches, num_batches // num_chunks, context, say)
            train_seconds = time.perf_counter() - started
            guard.arm()  # every shape has been seen once; a later trace is a recompile
            test = evaluate(model, state.params, dataset.x_test, dataset.y_test, loss=loss, metrics=metric_names)
            line = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": float(np.mean(losses)) if losses else None,
                "test_loss": test["loss"] if np.isfinite(test["loss"]) else None,
                "test_accuracy": test.get("accuracy"),
                "seconds": round(time.perf_counter() - started, 4),
                "steps_per_second": round(num_batches / train_seconds, 1),
                "skipped": skipped,
            }
            if dataset.vocabulary is not None:  # text: validation bits per character
                line["test_bpc"] = None if line["test_loss"] is None else line["test_loss"] / np.log(2.0)
            history.append(line)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
            say_line(run_log.epoch_line(line, config.epochs))
            checkpoint.save(out / "checkpoints", epoch, state, metadata={"config": dataclasses.asdict(config)},
                            keep=config.keep_checkpoints)
        if dataset.vocabulary is not None and history and history[-1].get("test_bpc") is not None:
            say_line(f"validation {history[-1]['test_bpc']:.3f} bits per character; the training text's unigram "
                     f"entropy is {data.unigram_entropy_bits(dataset.y_train):.3f} bits per character")
    finally:
        say.close()
        if history:
            run_log.plot_history(history, out / "curves.png")
    return TrainResult(state, model, history, out)


