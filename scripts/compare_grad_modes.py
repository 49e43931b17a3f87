"""Train the same MLP on digits four ways and plot the loss curves on top of each other.

    python scripts/compare_grad_modes.py --epochs 20 --out grad_modes.png

The ways: ``manual`` (the hand-written backward), ``autodiff`` (jax.grad),
``custom_vjp`` (jax.grad through the hand-written backward) and ``manual``
with per-example gradients averaged. All four compute the same gradient, so
from the same initial parameters and batches the curves coincide up to float
rounding; the script prints the largest difference from the manual curve.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fbp
from fbp import data

WAYS = {
    "manual": {"grad": "manual"},
    "autodiff": {"grad": "autodiff"},
    "custom_vjp": {"grad": "custom_vjp"},
    "manual, per-example": {"grad": "manual", "per_example": True},
}


def train(ds, model, params, options, epochs, seed):
    """Per-step training losses and the final test accuracy for one way of computing gradients."""
    optimizer = optax.adam(1e-3)
    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, **options)
    losses = []
    for epoch in range(1, epochs + 1):
        batches = data.batches(ds.x_train, ds.y_train, 32, key=data.epoch_key(seed, epoch))
        state, metrics = fbp.train_epoch(step, state, batches.xs, batches.ys)
        losses.append(np.asarray(metrics["loss"]))
    return np.concatenate(losses), fbp.evaluate(model, state.params, ds.x_test, ds.y_test)["accuracy"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="grad_modes.png", help="where to write the plot")
    args = parser.parse_args(argv)

    ds = data.load_digits()
    model = fbp.Sequential([fbp.Flatten(), fbp.Dense(128, weight_init="he"), fbp.ReLU(), fbp.Dense(10)])
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(ds.x_train[:1]))
    curves = {}
    for name, options in WAYS.items():
        start = time.perf_counter()
        curves[name], accuracy = train(ds, model, params, options, args.epochs, args.seed)
        gap = np.max(np.abs(curves[name] - curves["manual"]))
        print(f"{name:22s} test accuracy {accuracy:.2%}  max |loss - manual loss| {gap:.1e}  "
              f"({time.perf_counter() - start:.1f} s)")

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    steps_per_epoch = len(curves["manual"]) // args.epochs
    for (name, losses), style in zip(curves.items(), ("-", "--", ":", "-.")):
        per_epoch = losses.reshape(args.epochs, steps_per_epoch).mean(axis=1)
        left.plot(np.arange(1, args.epochs + 1), per_epoch, style, label=name)
        if name != "manual":
            gap = np.abs(losses - curves["manual"])
            right.plot(np.where(gap > 0, gap, np.nan), ".", markersize=2, label=name)
    left.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="the four curves coincide")
    left.legend()
    right.set(xlabel="step", ylabel="|loss - manual loss|", yscale="log", title="differences: float32 rounding")
    right.legend()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
