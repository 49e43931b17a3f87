"""Regression with the mean squared error on a synthetic data set (no download).

    python scripts/regression_mse.py --epochs 60

The target is y = sin(x A) + 0.5 x B + noise (``fbp.data.synthetic_regression``)
with noise standard deviation 0.1, so the best possible test MSE is about 0.01.
The script prints the test MSE next to that floor and to the MSE of always
predicting the mean (the variance of y).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbp
from fbp import data


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.synthetic_regression(jax.random.PRNGKey(args.seed), noise=0.1)  # x: (n, 8), y: (n, 1)
    model = fbp.Sequential([fbp.Dense(64), fbp.Tanh(), fbp.Dense(64), fbp.Tanh(), fbp.Dense(1)])
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(ds.x_train[:1]))
    optimizer = optax.adam(3e-3)
    state = fbp.TrainState.create(params, optimizer)
    loss = fbp.MSE()  # dL/dpred = 2 (pred - y) / size, written out in fbp/losses.py
    step = fbp.make_train_step(model, loss, optimizer)

    for epoch in range(1, args.epochs + 1):
        batches = data.batches(ds.x_train, ds.y_train, 64, key=data.epoch_key(args.seed, epoch))
        state, metrics = fbp.train_epoch(step, state, batches.xs, batches.ys)
        if epoch % 10 == 0 or epoch == args.epochs:
            test = fbp.evaluate(model, state.params, ds.x_test, ds.y_test, loss=loss, metrics=("loss",))
            print(f"epoch {epoch:3d}  train MSE {metrics['loss'].mean():.4f}  test MSE {test['loss']:.4f}")
    print(f"noise floor {0.1 ** 2:.4f}, predicting the mean {np.var(ds.y_test):.4f}")
    return test["loss"]


if __name__ == "__main__":
    main()
