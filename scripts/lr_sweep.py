"""The learning rate: too low crawls, a good one converges, too high diverges.

Trains the same small MLP (4 -> 32 -> 1, tanh, MSE) from the same start on a
synthetic regression task with plain full-batch gradient descent,
``params <- params - lr * grads``, the grads from fbp's hand-written backward,
for three learning rates, and plots the three loss curves side by side on
log-log axes. A run whose loss becomes non-finite or exceeds 1e6 is stopped and
marked "diverged"::

    python scripts/lr_sweep.py                          # writes docs/img/lr_sweep.png
    python scripts/lr_sweep.py --steps 20 --out plots
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp

import fbp

ROOT = Path(__file__).resolve().parent.parent
DIVERGED = 1e6  # a loss above this (the data's variance is about 1) counts as diverged
LEARNING_RATES = {"too low": 0.001, "good": 0.1, "too high": 0.7}


def problem(seed: int = 0, n: int = 256):
    """A smooth target y = sin(x a) + 0.5 (x b)^2 / 4 on x ~ N(0, 1)^4, with a 4 -> 32 -> 1 tanh MLP."""
    key_x, key_a, key_b, key_params = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(key_x, (n, 4))
    a, b = jax.random.normal(key_a, (4, 1)) / 2, jax.random.normal(key_b, (4, 1)) / 2
    y = jnp.sin(x @ a) + 0.125 * (x @ b) ** 2
    model = fbp.Sequential([fbp.Dense(32), fbp.Tanh(), fbp.Dense(1)])
    return model, model.init(key_params, x), x, y


def train(model, params, x, y, lr: float, steps: int) -> list[float]:
    """Full-batch gradient descent; returns the loss before every step, stopping early on divergence."""
    grad_fn = fbp.value_and_grad(model, fbp.MSE())

    @jax.jit
    def step(params):
        value, grads = grad_fn(params, x, y)
        return value, jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)  # the update rule

    losses = []
    for _ in range(steps):
        value, params = step(params)
        losses.append(float(value))
        if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED:
            break
    return losses


def plot(curves: dict[str, tuple[float, list[float]]], steps: int, path: Path) -> None:
    """Panels side by side: loss against step, both on log scales (the divergence takes a few steps), marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 3.6), dpi=100)
    for ax in axes[1:-1]:
        ax.sharey(axes[0])  # the converging runs on one scale; the diverging one needs its own
    colors = {"too low": "#7f7f7f", "good": "#1f4e79", "too high": "#c0392b"}
    for ax, (name, (lr, losses)) in zip(axes, curves.items()):
        finite = [v for v in losses if math.isfinite(v)]
        ax.loglog(range(1, len(finite) + 1), finite, ".-" if len(finite) < 30 else "-", color=colors.get(name, "k"))
        diverged = len(losses) < steps
        if diverged:
            last = (len(losses), losses[-1] if math.isfinite(losses[-1]) else DIVERGED)
            ax.plot(*last, "x", color="#c0392b", markersize=12, mew=3)
            ax.annotate(f"diverged: loss > {DIVERGED:.0e}\nafter {len(losses)} steps", last,
                        textcoords="offset points", xytext=(12, -8), va="top", color="#c0392b")
        ax.set_title(f"{name}: lr = {lr:g}" + ("" if diverged else f"  (final loss {finite[-1]:.3g})"))
        ax.set_xlim(1, steps)
        ax.set_xlabel("step (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("training loss (MSE, log scale)")
    fig.suptitle("Gradient descent on the same MLP from the same start, three learning rates")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="gradient descent steps per run (default: 300)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for lr_sweep.png")
    args = parser.parse_args(argv)
    model, params, x, y = problem()
    curves = {name: (lr, train(model, params, x, y, lr, args.steps)) for name, lr in LEARNING_RATES.items()}
    for name, (lr, losses) in curves.items():
        status = f"diverged after {len(losses)} steps" if len(losses) < args.steps else f"final {losses[-1]:.4f}"
        print(f"{name:9s} lr={lr:<6g} loss {losses[0]:.4f} -> {status}")
    plot(curves, args.steps, args.out / "lr_sweep.png")
    print(f"wrote {args.out / 'lr_sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
