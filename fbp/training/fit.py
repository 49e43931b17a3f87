"""The training loop behind ``fbp train``: data, model, epochs, metrics, checkpoints, faults.

    result = fbp.fit(fbp.TrainConfig(data="digits", model="mlp:256,256", epochs=40))
    result.history[-1]["test_accuracy"]        # about 0.98

Each epoch: the training set in an order drawn from ``(seed, epoch)`` (so a
resumed run sees the same batches as an uninterrupted one), cut into full
batches and run through ``fbp.train_epoch`` (one lax.scan, or a loop of the
jitted step for a model with convolutions on CPU: ``epoch_strategy``) in about ten
chunks, for a live progress bar; then the test set is evaluated, a line goes
to ``metrics.jsonl`` and the state is checkpointed (``fbp.training.checkpoint``).

DP-SGD (``noise_multiplier`` or ``target_epsilon``, with ``per_example`` and
``clip_norm``): the noise is fixed before training (calibrated to the target
over the run's total steps), batches are Poisson sampled by default (each
example joins a step with probability q = batch_size / N; padded to a static
size, the padding masked) and the update divides the noisy clipped sum by the
expected batch size q N; the epsilon spent so far (``fbp.privacy``) is printed
and logged each epoch. ``sampling="shuffle"`` keeps fixed-size shuffled
batches, for which that epsilon is only what the accountant gives as if they
were Poisson sampled.

Faults: NaN/Inf in the data is refused before training. A non-finite loss or
gradient during training either stops the run (``on_nonfinite="stop"``,
raising NonFiniteError that names the step and the first bad leaf; nothing
more is saved, so the last checkpoint is the last good state) or skips that
update and counts it (``"skip"``). A retrace of the compiled step after the
first epoch (a new input shape or dtype) warns with RetraceWarning.

(About 430 lines: ``TrainConfig``'s checks and the loop that relies on them read together;
the DP plan, the faults, the log and the checkpoints have their own files.)
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

from fbp import data, models, privacy
from fbp.check import GradientCheckError, check_gradients
from fbp.grads import GRAD_MODES
from fbp.layers.base import uses_key
from fbp.losses import MSE, SoftmaxCrossEntropy
from fbp.training import checkpoint
from fbp.training import log as run_log
from fbp.training.dp import PrivacyPlan, plan_privacy
from fbp.training.epoch import train_epoch
from fbp.training.evaluate import evaluate
from fbp.training.faults import NonFiniteError, RetraceGuard, first_nonfinite
from fbp.training.precision import PRECISIONS, value_and_grad_with_policy
from fbp.training.step import TrainState, TrainStep, make_train_step

OPTIMIZERS = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": optax.adam,
    "adamw": lambda lr: optax.adamw(lr, weight_decay=1e-4),
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.02, "adam": 1e-3, "adamw": 1e-3}
# options that may change between a run and its --resume without changing the result
_RESUMABLE_CHANGES = {"epochs", "resume", "quiet", "out", "check_gradients", "on_nonfinite", "keep_checkpoints"}
SAMPLINGS = ("poisson", "shuffle")


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
      target_epsilon: DP-SGD to this epsilon instead of a given ``noise_multiplier``: the noise is
        calibrated before training (``fbp.privacy.noise_multiplier_for_epsilon``) for the run's total
        steps (``epochs`` times the steps per epoch).
      delta: the delta of the reported epsilon; None: ``fbp.privacy.default_delta(N)`` (1/N rounded
        down to a power of ten).
      sampling: ``"poisson"`` (each example joins each step with probability q = batch_size / N,
        batches padded and masked: what the accountant assumes) or ``"shuffle"`` (fixed-size batches
        of a shuffled epoch); None: Poisson for DP-SGD, shuffled otherwise.
      accountant: ``"rdp"`` or ``"pld"`` (``fbp.privacy``), for the epsilon and the calibration.
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
    target_epsilon: float | None = None
    delta: float | None = None
    sampling: str | None = None
    accountant: str = "rdp"
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
                   "precision": PRECISIONS, "accountant": privacy.ACCOUNTANTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "keep_checkpoints", "chunks_per_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "clip_norm", "noise_multiplier", "target_epsilon"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.clip_norm is not None and not self.per_example:
            raise ValueError("clip_norm clips each example's gradient: it needs per_example (--per-example)")
        if self.noise_multiplier is not None and self.clip_norm is None:
            raise ValueError("noise_multiplier scales noise by clip_norm: it needs clip_norm (--clip-norm)")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give target_epsilon (--target-epsilon: the noise is calibrated to it) or "
                             "noise_multiplier (--noise-multiplier: epsilon is reported), not both")
        if self.target_epsilon is not None and self.clip_norm is None:
            raise ValueError("target_epsilon is for DP-SGD: it needs per_example and clip_norm "
                             "(--per-example --clip-norm C)")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.delta is not None and not self.private:
            raise ValueError("delta is the delta of DP-SGD's epsilon: it needs --noise-multiplier or --target-epsilon")
        if self.sampling is not None and self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.devices is not None and (self.devices < 1 or self.batch_size % self.devices):
            raise ValueError(f"devices must be >= 1 and divide batch_size {self.batch_size}, got {self.devices}")
        models.parse(self.model)

    @property
    def private(self) -> bool:
        """Whether this is a DP-SGD run (noise, given or calibrated to a target epsilon)."""
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def batch_sampling(self) -> str:
        """``sampling``, or its default: ``"poisson"`` for DP-SGD, ``"shuffle"`` otherwise."""
        if self.sampling is not None:
            return self.sampling
        return "poisson" if self.private else "shuffle"

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


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """``sgd``, ``momentum``, ``adam`` or ``adamw`` at learning rate ``lr``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](lr)


def _make_step(model, loss, optimizer, config: TrainConfig, plan: PrivacyPlan | None = None) -> TrainStep:
    options = {"grad": config.grad, "per_example": config.per_example, "clip_norm": config.clip_norm,
               "noise_multiplier": config.noise_multiplier, "precision": config.precision}
    if plan is not None:
        options["noise_multiplier"] = plan.noise_multiplier
        if plan.sampling == "poisson":  # the noisy sum over the expected batch size q N = batch_size
            options["normalize_by"] = float(config.batch_size)
    if config.devices is None:
        return make_train_step(model, loss, optimizer, **options)
    try:
        from fbp import parallel
    except ImportError as error:
        raise ValueError(f"--devices needs fbp.parallel (data parallelism), which cannot be imported: {error}") from error
    return make_train_step(model, loss, optimizer, mesh=parallel.make_mesh(config.devices), **options)


_copy = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


def _diagnose(step: TrainStep, loss, config: TrainConfig, state, xs, ys, index: int, masks=None) -> str:
    """Replay a chunk up to its first non-finite batch and name the first bad leaf of that batch's gradient."""
    model = step.model
    mask = None if masks is None else masks[index]
    for j in range(index):
        state, _ = step(state, xs[j], ys[j], None if masks is None else masks[j])
    key = state.rng if uses_key(model, state.params, xs[index], state.rng) else None
    # the gradient as the step computes it: under its precision policy (casts, loss scale)
    value, grads = value_and_grad_with_policy(model, loss, step.policy, grad=config.grad,
                                              per_example=config.per_example)(state.params, xs[index], ys[index], key,
                                                                              mask)
    leaf = first_nonfinite(value, grads)
    if leaf is None:
        return "update (the clipped or noised gradient)"
    return "loss" if leaf == "loss" else f"gradient in {leaf}"


def _resume(config: TrainConfig, state: TrainState) -> tuple[TrainState, int, list[dict], dict | None]:
    """Restore the last complete checkpoint of ``config.out_dir``: (state, its epoch, metrics up to it,
    the run's privacy plan or None)."""
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
    return jax.tree_util.tree_map(jnp.asarray, state), meta["epoch"], history, meta["metadata"].get("privacy")


def _clear_checkpoints(folder: Path) -> None:
    """Delete an earlier run's checkpoints, refusing a folder that holds anything else."""
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not checkpoint.is_checkpoint_folder_entry(p.name))
    if foreign:
        raise ValueError(f"{folder} holds files that are not fbp checkpoints ({', '.join(foreign[:3])}); "
                         "choose another --out")
    shutil.rmtree(folder)


def _run_epoch(guard: RetraceGuard, state, batches, chunk: int, context: dict, say: run_log.Progress):
    """One epoch as ``train_epoch`` calls of ``chunk`` steps each, in the strategy it picks for the model and
    backend (a scan, or a loop of the jitted step). ``batches``: ``data.Batches``, or ``data.PoissonBatches``
    (masked). Returns (state, finite training losses, skipped updates)."""
    config, epoch = context["config"], context["epoch"]
    num_batches = batches.xs.shape[0]
    all_masks = getattr(batches, "mask", None)
    losses, skipped = [], 0
    for start in range(0, num_batches, chunk):
        xs, ys = batches.xs[start : start + chunk], batches.ys[start : start + chunk]
        masks = None if all_masks is None else all_masks[start : start + chunk]
        before = _copy(state) if config.on_nonfinite == "stop" else None  # the step donates `state`
        state, metrics = train_epoch(guard.step, state, xs, ys, masks=masks)
        finite = np.asarray(metrics["finite"])
        if not finite.all() and config.on_nonfinite == "stop":
            index = int(np.argmin(finite))
            what = _diagnose(context["step"], context["loss"], config, before, xs, ys, index, masks)
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

    out = config.out_dir
    start_epoch, history, saved_plan = 0, [], None
    if config.resume:
        state, start_epoch, history, saved_plan = _resume(config, state)
    num_examples = dataset.x_train.shape[0]
    plan = plan_privacy(config, num_examples, config.epochs * num_batches, saved_plan)
    step = _make_step(model, loss, optimizer, config, plan)
    if not config.resume:
        _clear_checkpoints(out / "checkpoints")  # a fresh run replaces an earlier one's
    out.mkdir(parents=True, exist_ok=True)
    if dataset.vocabulary is not None:  # text: fbp generate needs the characters back
        data.save_vocabulary(out, dataset)
    written = dataclasses.asdict(config)
    if plan is not None:  # the mechanism, and the epsilon of the whole run as configured
        written["privacy"] = plan.as_dict(plan.epsilon(config.epochs * num_batches))
    (out / "config.json").write_text(json.dumps(written, indent=1) + "\n")
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
        if plan is not None:
            say_line(plan.describe(config, num_examples))
            if config.resume and config.epochs * num_batches > plan.steps:
                say_line(f"note: the noise was fixed for {plan.steps} steps; the {config.epochs * num_batches} "
                         "steps now asked for spend more (epsilon is reported as it grows)")
        if start_epoch >= config.epochs:
            say_line(f"already at epoch {start_epoch} of {config.epochs}: nothing to do "
                     f"(raise --epochs to train further; outputs in {out})")
        elif start_epoch:
            say_line(f"resumed from {checkpoint.latest(out / 'checkpoints')} (epoch {start_epoch})")
        if config.check_gradients and start_epoch < config.epochs:
            key = data.epoch_key(config.seed, start_epoch + 1)
            first = data.batches(x_train, y_train, config.batch_size, key=key)
            # the key reaches Dropout: its mask is checked too
            report = check_gradients(model, loss, state.params, first.xs[0], first.ys[0], key=key, seed=config.seed)
            say_line(str(report))
            if not report.ok:
                raise GradientCheckError(f"--check-gradients: the gradient check failed on the first batch\n{report}")
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            if plan is not None and plan.sampling == "poisson":
                batches = data.poisson_batches(x_train, y_train, plan.sampling_rate, num_batches,
                                               key=data.epoch_key(config.seed, epoch),
                                               max_batch_size=plan.max_batch_size)
            else:
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
            if plan is not None:  # every step taken so far, applied or skipped: each one saw the data
                line["epsilon"] = plan.epsilon(epoch * num_batches)
            if dataset.vocabulary is not None:  # text: validation bits per character
                line["test_bpc"] = None if line["test_loss"] is None else line["test_loss"] / np.log(2.0)
            history.append(line)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
            say_line(run_log.epoch_line(line, config.epochs))
            metadata = {"config": dataclasses.asdict(config)}
            if plan is not None:
                metadata["privacy"] = plan._asdict()
            checkpoint.save(out / "checkpoints", epoch, state, metadata=metadata, keep=config.keep_checkpoints)
        if dataset.vocabulary is not None and history and history[-1].get("test_bpc") is not None:
            say_line(f"validation {history[-1]['test_bpc']:.3f} bits per character; the training text's unigram "
                     f"entropy is {data.unigram_entropy_bits(dataset.y_train):.3f} bits per character")
    finally:
        say.close()
        if history:
            run_log.plot_history(history, out / "curves.png")
    return TrainResult(state, model, history, out)


