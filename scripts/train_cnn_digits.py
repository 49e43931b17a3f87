"""Train a small CNN on scikit-learn's 8x8 digits: Conv2D and MaxPool2D with hand-written backward passes.

    python scripts/train_cnn_digits.py --epochs 15

Two conv blocks (3x3 convolution, ReLU, 2x2 max-pool) take the 8x8 image to
2x2x32, then a Dense layer gives the logits. Reaches about 97% test accuracy.
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import fbp
from fbp import data


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.load_digits()  # images (n, 8, 8, 1), NHWC
    model = fbp.Sequential([
        fbp.Conv2D(16, kernel_size=3), fbp.ReLU(), fbp.MaxPool2D(2),  # -> (n, 4, 4, 16)
        fbp.Conv2D(32, kernel_size=3), fbp.ReLU(), fbp.MaxPool2D(2),  # -> (n, 2, 2, 32)
        fbp.Flatten(),                                                # -> (n, 128)
        fbp.Dense(10),
    ])
    params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(ds.x_train[:1]))
    optimizer = optax.adam(3e-3)
    state = fbp.TrainState.create(params, optimizer)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer)

    for epoch in range(1, args.epochs + 1):
        batches = data.batches(ds.x_train, ds.y_train, 32, key=data.epoch_key(args.seed, epoch))
        state, metrics = fbp.train_epoch(step, state, batches.xs, batches.ys)
        test = fbp.evaluate(model, state.params, ds.x_test, ds.y_test)
        print(f"epoch {epoch:3d}  train loss {metrics['loss'].mean():.4f}  test accuracy {test['accuracy']:.2%}")
    return test["accuracy"]


if __name__ == "__main__":
    main()
