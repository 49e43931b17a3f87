"""``fbp train``: train a model with hand-written gradients; a front end over ``fbp.training.fit``.

Exit status: 0 done; 1 a known failure (a non-finite loss or gradient, a failed
--check-gradients, missing data, an unusable checkpoint), one line on stderr; 2 a bad option.
"""

from __future__ import annotations

import argparse

from fbp import data
from fbp.privacy import ACCOUNTANTS
from fbp.training.fit import DEFAULT_LR, OPTIMIZERS, SAMPLINGS, TrainConfig
from fbp.training.precision import PRECISIONS

_DEFAULTS = TrainConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train a model (default: an MLP on the bundled digits, >= 97%% test accuracy in under a minute)",
        description=(
            "Train a model with the hand-written backward passes. Writes to --out: metrics.jsonl (one JSON line "
            "per epoch), checkpoints/ (the last few epochs, orbax), curves.png and config.json. "
            "Exit status: 0 done; 1 a known failure (non-finite loss or gradient, failed gradient check, missing "
            "data, unusable checkpoint); 2 a bad option."
        ),
    )
    parser.add_argument("--data", default=_DEFAULTS.data, metavar="{" + ",".join(data.DATASETS) + ",text:PATH}",
                        help="data set (default: %(default)s); mnist and fashion-mnist read local IDX files; "
                        "digits-rows, adding and copy are sequences; text is characters of the Python standard "
                        "library's source, text:PATH those of a local UTF-8 file")
    parser.add_argument("--data-dir", help="folder with the IDX files (train-images-idx3-ubyte[.gz], ...)")
    parser.add_argument("--model", default=_DEFAULTS.model,
                        help="mlp[:W1,W2,...] or cnn[:C1,C2,...]; for sequences rnn[:H1,...], gru[:H1,...], "
                        "lstm[:H1,...], cnn1d[:C1,...] or transformer[:d_model=64,layers=2,heads=4,mlp_ratio=4] "
                        "(default: %(default)s)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=_DEFAULTS.optimizer,
                        help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, help="learning rate (default by optimizer: "
                        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    parser.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="(default: %(default)s)")
    parser.add_argument("--grad", choices=("manual", "autodiff", "custom_vjp"), default=_DEFAULTS.grad,
                        help="how gradients are computed (default: %(default)s, the hand-written backward)")
    parser.add_argument("--per-example", action="store_true", help="per-example gradients (vmap), averaged")
    parser.add_argument("--clip-norm", type=float, help="clip each example's gradient to this L2 norm (DP-SGD)")
    parser.add_argument("--noise-multiplier", type=float,
                        help="DP-SGD Gaussian noise, in units of --clip-norm; the epsilon spent is printed each epoch")
    parser.add_argument("--target-epsilon", type=float,
                        help="DP-SGD to this epsilon: the noise is calibrated before training for the run's steps "
                        "(instead of --noise-multiplier)")
    parser.add_argument("--delta", type=float,
                        help="delta of the DP epsilon (default: 1/N rounded down to a power of ten)")
    parser.add_argument("--sampling", choices=SAMPLINGS,
                        help="batches: poisson (each example joins a step with probability batch-size/N, what the "
                        "privacy accountant assumes; the default with DP noise) or shuffle (fixed-size shuffled "
                        "batches; the default otherwise)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=_DEFAULTS.accountant,
                        help="privacy accountant for epsilon and calibration: rdp or pld (tighter, slower) "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="(default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: runs/<data>-<model>-seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument("--check-gradients", action="store_true",
                        help="check the gradients on the first batch before training; abort if wrong")
    parser.add_argument("--devices", type=int, help="data-parallel over this many devices")
    parser.add_argument("--precision", choices=PRECISIONS, default=_DEFAULTS.precision,
                        help="compute dtype of forward and backward; params and optimizer state stay float32, "
                             "loss and norms accumulate in float32 (default: %(default)s)")
    parser.add_argument("--on-nonfinite", choices=("stop", "skip"), default=_DEFAULTS.on_nonfinite,
                        help="on a NaN/Inf loss or gradient: stop, or skip that update (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only errors; no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Train with the parsed options; return the exit status (errors are turned into codes by fbp.cli)."""
    from fbp.cli import UsageError
    from fbp.training.fit import fit

    config = TrainConfig(
        data=args.data, data_dir=args.data_dir, model=args.model, optimizer=args.optimizer, lr=args.lr,
        epochs=args.epochs, batch_size=args.batch_size, grad=args.grad, per_example=args.per_example,
        clip_norm=args.clip_norm, noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
        delta=args.delta, sampling=args.sampling, accountant=args.accountant, seed=args.seed, out=args.out,
        resume=args.resume, check_gradients=args.check_gradients, devices=args.devices,
        on_nonfinite=args.on_nonfinite, quiet=args.quiet, precision=args.precision,
    )
    try:
        config.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    result = fit(config)
    if not config.quiet and result.history:
        last = result.history[-1]
        accuracy, test_loss = last["test_accuracy"], last["test_loss"]
        if accuracy is not None:
            score = f"test accuracy {100 * accuracy:.2f}%"
        else:
            score = "test loss nan" if test_loss is None else f"test loss {test_loss:.4g}"
        if last.get("epsilon") is not None:
            score += f" at epsilon {last['epsilon']:.3g}"
        print(f"done: {score} after {last['epoch']} epochs of {config.model}; outputs in {result.out_dir}")
    return 0
