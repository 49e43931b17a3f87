"""Train an MLP on scikit-learn's 8x8 digits with the hand-written backward pass.

    python scripts/train_mlp_digits.py --epochs 40

The whole loop in a page: load the data, build the model, make the jitted train
step, and run each epoch as one lax.scan over its shuffled batches. Reaches
about 98% test accuracy in 40 epochs. ``fbp train`` does the same with
checkpoints, metrics and a progress bar.
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import fbp
from fbp import data


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.load_digits()  # x: (n, 8, 8, 1) in [0, 1], y: (n,) int labels
    model = fbp.Sequential([
        fbp.Flatten(),  # (n, 8, 8, 1) -> (n, 64)
        fbp.Dense(256, weight_init="he"), fbp.ReLU(),
        fbp.Dense(256, weight_init="he"), fbp.ReLU(),
        fbp.Dense(10),  # logits
    ])
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(ds.x_train[:1]))
    optimizer = optax.adam(1e-3)
    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, grad="manual")

    for epoch in range(1, args.epochs + 1):
        # the order of an epoch depends on (seed, epoch) only
        batches = data.batches(ds.x_train, ds.y_train, 32, key=data.epoch_key(args.seed, epoch))
        state, metrics = fbp.train_epoch(step, state, batches.xs, batches.ys)  # one compiled scan
        test = fbp.evaluate(model, state.params, ds.x_test, ds.y_test)
        print(f"epoch {epoch:3d}  train loss {metrics['loss'].mean():.4f}  "
              f"test loss {test['loss']:.4f}  test accuracy {test['accuracy']:.2%}")
    return test["accuracy"]


if __name__ == "__main__":
    main()
