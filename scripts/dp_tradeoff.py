"""Differentially private training of the 8x8 digits: test accuracy against epsilon over a few noise levels.

    python scripts/dp_tradeoff.py                      # about 5 minutes on a 2-core CPU
    python scripts/dp_tradeoff.py --epochs 2 --noise 1.1 --seeds 0 --out /tmp/dp.png   # a quick look

Every run is ``fbp.fit`` as ``fbp train`` runs it: the digits MLP (64-256-256-10) trained by DP-SGD
(per-example clipping to norm 1, Gaussian noise, Poisson sampling at q = 64 / 1438, Adam at 3e-3,
40 epochs = 880 steps), its epsilon at delta = 1e-4 from the RDP accountant (``fbp.privacy``). One
run per noise multiplier and seed, one run calibrated to a stated epsilon (``--target``), and two
references without noise: clipped (epsilon infinite) and plain. Prints a markdown table and saves
the accuracy/epsilon plot (docs/img/dp_tradeoff.png; the numbers in docs/privacy.md come from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from fbp.training.fit import TrainConfig, fit

ROOT = Path(__file__).resolve().parent.parent
NOISE = (0.6, 0.8, 1.1, 1.6, 2.5, 4.0)
BASE = TrainConfig(data="digits", model="mlp:256,256", optimizer="adam", lr=3e-3, epochs=40, batch_size=64,
                   quiet=True)


def run(config: TrainConfig, folder: Path) -> dict:
    """Train once; the last epoch's test accuracy and epsilon, and the noise the run used."""
    started = time.perf_counter()
    result = fit(dataclasses.replace(config, out=str(folder)))
    last = result.history[-1]
    privacy = json.loads((folder / "config.json").read_text()).get("privacy")  # a DP run's mechanism
    sigma = None if privacy is None else privacy["noise_multiplier"]
    return {"accuracy": last["test_accuracy"], "epsilon": last.get("epsilon"), "sigma": sigma,
            "seconds": time.perf_counter() - started}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=BASE.epochs)
    parser.add_argument("--noise", type=float, nargs="+", default=NOISE, help="noise multipliers to run")
    parser.add_argument("--target", type=float, default=2.0, help="also calibrate one run to this epsilon")
    parser.add_argument("--seeds", type=int, nargs="+", default=(0, 1))
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "dp_tradeoff.png"), help="the plot (PNG)")
    args = parser.parse_args(argv)

    base = dataclasses.replace(BASE, epochs=args.epochs)
    dp = dataclasses.replace(base, per_example=True, clip_norm=1.0)
    settings = [("no clipping, no noise", base), ("clipped, no noise", dp)]
    settings += [(f"sigma {sigma:g}", dataclasses.replace(dp, noise_multiplier=sigma)) for sigma in args.noise]
    settings.append((f"target epsilon {args.target:g}", dataclasses.replace(dp, target_epsilon=args.target)))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in settings:
            runs = [run(dataclasses.replace(config, seed=seed), Path(scratch) / f"{len(rows)}-{seed}")
                    for seed in args.seeds]
            rows.append({"setting": name, "runs": runs, "accuracy": statistics.mean(r["accuracy"] for r in runs),
                         "epsilon": runs[0]["epsilon"], "sigma": runs[0]["sigma"]})
            epsilon = "inf" if rows[-1]["epsilon"] is None else f"{rows[-1]['epsilon']:.2f}"
            print(f"{name:24s} epsilon {epsilon:>6s}  test accuracy "
                  + ", ".join(f"{r['accuracy']:.4f}" for r in runs)
                  + f"  ({sum(r['seconds'] for r in runs):.0f} s)", flush=True)

    print("\n| setting | noise multiplier | epsilon (delta 1e-4, RDP) | test accuracy (mean over seeds) |")
    print("|---|---|---|---|")
    for row in rows:
        sigma = "-" if row["sigma"] is None else f"{row['sigma']:.3g}"
        epsilon = "inf" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        print(f"| {row['setting']} | {sigma} | {epsilon} | {100 * row['accuracy']:.1f}% |")
    plot(rows, args.out, args.epochs, len(args.seeds))
    print(f"\nwrote {args.out}")
    return rows


def plot(rows: list[dict], path: str, epochs: int, seeds: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    private = [row for row in rows if row["epsilon"] is not None]
    swept = sorted((row for row in private if row["setting"].startswith("sigma")), key=lambda row: row["epsilon"])
    ax.plot([row["epsilon"] for row in swept], [100 * row["accuracy"] for row in swept], marker="o", color="C0",
            label=f"DP-SGD, one noise multiplier per point (mean of {seeds} seeds)")
    for row in swept:
        ax.annotate(f"sigma {row['sigma']:g}", (row["epsilon"], 100 * row["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    for row in private:
        if row["setting"].startswith("target"):
            ax.plot([row["epsilon"]], [100 * row["accuracy"]], marker="*", markersize=12, color="C3", linestyle="",
                    label=f"{row['setting']} (sigma {row['sigma']:.3g}, calibrated)")
    for row, (style, color) in zip((r for r in rows if r["epsilon"] is None), (("--", "gray"), (":", "black"))):
        ax.axhline(100 * row["accuracy"], color=color, linestyle=style,
                   label=f"{row['setting']}: {100 * row['accuracy']:.1f}% (epsilon inf)")
    ax.set(xscale="log", xlabel="epsilon (delta = 1e-4, RDP accountant)", ylabel="test accuracy (%)",
           title=f"Digits MLP, DP-SGD: clip 1, Poisson q = 64/1438, {epochs} epochs")
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64) if any(row["epsilon"] <= 2 * t for row in private)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="lower right")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
