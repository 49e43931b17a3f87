"""Why backprop is needed: finite differences cost 2 forward passes per parameter, backprop about 3 in all.

For MLPs of growing width (8 -> w -> w -> 1, tanh, batch 32, float64) this
measures the time of one forward pass, of one backprop gradient
(``fbp.value_and_grad``: forward, then the hand-written backward), and of the
finite-difference gradient (``fbp.explain.finite_difference_gradient``: two
forward passes per parameter), checks that both gradients agree, prints a
Markdown table and writes a log-log plot::

    python scripts/why_backprop.py                       # writes docs/img/why_backprop.png
    python scripts/why_backprop.py --widths 2,4 --out plots
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fbp
from fbp.explain import finite_difference_gradient

ROOT = Path(__file__).resolve().parent.parent


def seconds_per_call(fn, *args, rounds: int = 5, round_seconds: float = 0.05) -> float:
    """Wall time of one ``fn(*args)`` call: the best of ``rounds`` averages (the least disturbed by other work)."""
    jax.block_until_ready(fn(*args))  # compile outside the timing
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < round_seconds:
            jax.block_until_ready(fn(*args))
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(width: int, *, batch: int = 32, in_features: int = 8, seed: int = 0, rounds: int = 5) -> dict:
    """Costs of the three computations for the MLP 8 -> width -> width -> 1."""
    model = fbp.Sequential([fbp.Dense(width), fbp.Tanh(), fbp.Dense(width), fbp.Tanh(), fbp.Dense(1)])
    loss = fbp.MSE()
    key_x, key_params = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key_x, (batch, in_features), jnp.float64)
    y = jnp.sin(x[:, :1])
    params = model.init(key_params, x)
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))

    def f(p):
        return loss(model.apply(p, x), y)

    forward = jax.jit(f)
    backprop = jax.jit(fbp.value_and_grad(model, loss))
    finite_difference_gradient(f, params)  # compile once, outside the timing
    start = time.perf_counter()
    fd_grads, forward_passes = finite_difference_gradient(f, params)
    jax.block_until_ready(fd_grads)
    fd_seconds = time.perf_counter() - start
    _, bp_grads = backprop(params, x, y)
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree_util.tree_leaves(fd_grads), jax.tree_util.tree_leaves(bp_grads)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(bp_grads))
    return {
        "width": width,
        "params": num_params,
        "fd_forward_passes": forward_passes,
        "forward_s": seconds_per_call(forward, params, rounds=rounds),
        "backprop_s": seconds_per_call(backprop, params, x, y, rounds=rounds),
        "fd_s": fd_seconds,
        "max_abs_diff": error,
        "grad_scale": scale,
    }


def table(rows: list[dict]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        ("| params | FD forward passes | one forward | backprop (forward + backward) | finite differences "
         "| FD / backprop | max abs diff FD vs backprop |"),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['params']:,} | {r['fd_forward_passes']:,} | {r['forward_s'] * 1e6:.0f} us "
            f"| {r['backprop_s'] * 1e6:.0f} us | {r['fd_s'] * 1e3:.1f} ms | {r['fd_s'] / r['backprop_s']:,.0f}x "
            f"| {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Log-log plot of time against number of parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = np.array([r["params"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.loglog(params, [r["fd_s"] for r in rows], "o-", color="#c0392b",
              label="finite differences (2 forward passes per parameter)")
    ax.loglog(params, [r["backprop_s"] for r in rows], "s-", color="#1f4e79", label="backprop (1 forward + 1 backward)")
    ax.loglog(params, [r["forward_s"] for r in rows], "^--", color="#7f7f7f", label="one forward pass")
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("seconds per gradient (CPU)")
    ax.set_title("The cost of one gradient: finite differences vs backprop")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="2,4,8,16,32,64,128", help="hidden widths, comma separated")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for why_backprop.png")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per measurement; the best counts")
    args = parser.parse_args(argv)
    with jax.enable_x64(True):
        rows = [measure(int(w), rounds=args.rounds) for w in args.widths.split(",")]
    print(table(rows))
    for r in rows:
        if not r["max_abs_diff"] <= 1e-6 * max(1.0, r["grad_scale"]):
            raise SystemExit(f"finite differences disagree with backprop at width {r['width']}: {r['max_abs_diff']}")
    plot(rows, args.out / "why_backprop.png")
    print(f"\nwrote {args.out / 'why_backprop.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
