"""Backpropagation through time, seen: the norm of dL/dh_t against t for SimpleRNN, GRU and LSTM on the adding problem.

    python scripts/bptt_grad_norms.py            # trains the three default runs (a few minutes), writes the figure
    python scripts/bptt_grad_norms.py --quick    # initial parameters only (seconds)

For each cell, the model is ``fbp train --data adding --model <cell>:64``'s (the
recurrent layer, then Dense on its last state), at its initial parameters and after
that default run (40 epochs, ``fbp.fit``). On 256 test sequences of length 50 the
loss of one example is (y_hat - y)^2, so dL/dh_{T-1} = 2 (y_hat - y) W_dense^T and
every earlier dL/dh_t comes from the layer's own hand-written reverse scan:
``hidden_grads`` runs the very steps the layer's ``backward`` runs and records
dh_t = dy_t + dh_next, the quantity the scan carries; the script plots its norm,
averaged over the sequences, relative to its value at the last step (a trained model's
error, and so every dL/dh_t, is small; the ratio is what shows how far the gradient
travels). The value that matters sits at the marked steps, one
in each half, so what reaches t < 25 is what teaches the model the first marker.

Writes docs/img/bptt_grad_norms.png and prints the ratio ||dL/dh_0|| / ||dL/dh_49||.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fbp
from fbp import data, models

CELLS = {"rnn": "SimpleRNN", "gru": "GRU", "lstm": "LSTM"}
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "img" / "bptt_grad_norms.png"


def grad_norms_over_time(model, params, x, y) -> np.ndarray:
    """Mean over sequences of ||dL_i/dh_t|| for every t, from the layer's own backward: ``(T,)``."""
    recurrent, dense = model.layers
    h_last, cache = recurrent.forward(params[0], x)
    y_hat, dense_cache = dense.forward(params[1], h_last)
    _, dh_last = dense.backward(params[1], dense_cache, 2.0 * (y_hat - y))  # one example's loss, per example

    dh = recurrent.hidden_grads(params[0], cache, dh_last)  # (T, N, H)
    np.testing.assert_allclose(dh[-1], dh_last, rtol=1e-6)  # the last step receives exactly the head's gradient
    return np.asarray(jnp.linalg.norm(dh, axis=-1).mean(axis=1))


def trained_params(kind: str, folder: str):
    result = fbp.fit(fbp.TrainConfig(data="adding", model=f"{kind}:64", quiet=True, out=f"{folder}/{kind}"))
    print(f"{CELLS[kind]:>9}: trained, test MSE {result.history[-1]['test_loss']:.4f} (answering 1: 0.167)")
    return result.state.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="initial parameters only")
    parser.add_argument("--out", default=str(FIGURE), help="where to write the figure (default: %(default)s)")
    args = parser.parse_args()

    ds = data.load("adding")
    x, y = jnp.asarray(ds.x_test[:256]), jnp.asarray(ds.y_test[:256])
    curves = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in CELLS:
            model = models.build_for(f"{kind}:64", ds)
            init_key, _ = jax.random.split(jax.random.PRNGKey(0))  # fit's initial parameters for seed 0
            curves[kind, "initial"] = grad_norms_over_time(model, model.init(init_key, x[:1]), x, y)
            if not args.quick:
                curves[kind, "trained"] = grad_norms_over_time(model, trained_params(kind, folder), x, y)
    for (kind, when), norms in curves.items():
        print(f"{CELLS[kind]:>9} {when:>8}: ||dL/dh_0|| / ||dL/dh_49|| = {norms[0] / norms[-1]:.3g}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    whens = sorted({when for _, when in curves}, key=["initial", "trained"].index)
    fig = Figure(figsize=(4.5 * len(whens), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(whens), squeeze=False, sharey=True)[0]
    for ax, when in zip(axes, whens):
        for i, kind in enumerate(CELLS):
            norms = curves[kind, when]
            ax.plot(norms / norms[-1], color=f"C{i}", label=CELLS[kind])
        title = "at initialisation" if when == "initial" else "after fbp train's default run"
        ax.set(yscale="log", xlabel="time step t", title=title)
        ax.axvline(len(curves[kind, when]) / 2, color="0.8", lw=0.8)  # the two markers: one in each half
    axes[0].set_ylabel("mean ||dL/dh_t||, relative to t = 49")
    axes[0].legend()
    fig.suptitle("Adding problem, T = 50: the gradient that reaches step t")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
