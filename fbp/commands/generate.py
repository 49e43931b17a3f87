"""``fbp generate``: sample text from a language model that ``fbp train --data text[:PATH]`` trained.

Reads the run folder: ``config.json`` (the model spec and optimizer, to rebuild the
state the checkpoint holds), ``vocabulary.json`` (characters, window) and the newest
complete checkpoint in ``checkpoints/``; then draws characters with ``fbp.models.sample``.

Exit status: 0 done; 1 a known failure (no such run, not a text run, no usable checkpoint); 2 a bad option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``fbp`` command's subparsers."""
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a model trained with fbp train --data text[:PATH]",
        description=(
            "Sample characters from the language model in a run folder of `fbp train --data text[:PATH]` "
            "(its newest checkpoint) and print the prompt and what follows. "
            "Exit status: 0 done; 1 a known failure (no such run, not a text run, no usable checkpoint); "
            "2 a bad option."
        ),
    )
    parser.add_argument("--out", required=True, help="the run folder that fbp train wrote (its --out)")
    parser.add_argument("--length", type=int, default=500, help="characters to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature: lower is more conservative, 0 takes the most likely character "
                        "(default: %(default)s)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start after a newline)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser


def _load_run(out: Path):
    """(model, params, vocabulary dict) from a text run's folder."""
    import jax
    import jax.numpy as jnp

    from fbp import data, models
    from fbp.training import checkpoint
    from fbp.training.fit import TrainConfig, make_optimizer
    from fbp.training.step import TrainState

    if not out.is_dir():
        raise FileNotFoundError(f"no run folder {out}; train first: fbp train --data text --out {out}")
    config_path = out / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: {out} is not a run folder of fbp train")
    vocabulary = data.read_vocabulary(out)
    saved = json.loads(config_path.read_text())
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{name: value for name, value in saved.items() if name in known})
    num_classes, window = vocabulary["unknown_id"] + 1, int(vocabulary["window"])
    model = models.build(config.model, (window,), num_classes, per_step=True, num_embeddings=num_classes)
    init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))  # as fit makes them: the same structure
    params = jax.jit(model.init)(init_key, jnp.zeros((1, window), jnp.int32))
    like = TrainState.create(params, make_optimizer(config.optimizer, config.learning_rate), rng=rng)
    path = checkpoint.latest(out / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {out / 'checkpoints'}; train first (fbp train --out {out})")
    state, _ = checkpoint.restore(path, like)
    return model, state.params, vocabulary


def run(args: argparse.Namespace) -> int:
    """Print ``--prompt`` and ``--length`` sampled characters; return the exit status."""
    from fbp.cli import UsageError

    if args.length < 1:
        raise UsageError(f"--length must be a positive integer, got {args.length}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")

    import jax

    from fbp import data, models

    model, params, vocabulary = _load_run(Path(args.out).expanduser().absolute())
    characters, unknown = vocabulary["characters"], vocabulary["unknown_id"]
    start = args.prompt or ("\n" if "\n" in characters else characters[0])
    ids = models.sample(model, params, data.encode(start, characters), length=args.length,
                        window=int(vocabulary["window"]), key=jax.random.PRNGKey(args.seed),
                        temperature=args.temperature, exclude=unknown)
    sys.stdout.write(args.prompt + data.decode(ids, characters) + "\n")
    return 0
