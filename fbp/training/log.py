"""The run log of ``fbp train``: metrics.jsonl, curves.png, and what the terminal shows while training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool):
        self.quiet = quiet
        self.bar = None
        if not quiet and total > 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    def update(self, steps: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def write(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_history(path: Path, up_to_epoch: int) -> list[dict]:
    """Lines of metrics.jsonl with epoch <= up_to_epoch (a killed run may have written one more)."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["epoch"] <= up_to_epoch]


def write_history(path: Path, history: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in history))


def plot_history(history: list[dict], path: str | Path) -> None:
    """Save loss (train and test), test accuracy and, for DP-SGD, the epsilon spent per epoch as a PNG
    (matplotlib, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    has_accuracy = any(h.get("test_accuracy") is not None for h in history)
    has_epsilon = any(h.get("epsilon") is not None for h in history)
    panels = 1 + has_accuracy + has_epsilon
    fig = Figure(figsize=(1 + 4 * panels, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(epochs, [np.nan if h[key] is None else h[key] for h in history], marker=".", label=label)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    axes[0].legend()
    if has_accuracy:
        axes[1].plot(epochs, [h["test_accuracy"] for h in history], marker=".", color="C2")
        axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    if has_epsilon:
        spent = [np.nan if h.get("epsilon") is None else h["epsilon"] for h in history]
        axes[-1].plot(epochs, spent, marker=".", color="C3")
        axes[-1].set(xlabel="epoch", ylabel="epsilon", title="privacy spent (epsilon)", ylim=(0, None))
    fig.savefig(path, dpi=100)


def epoch_line(line: dict, epochs: int) -> str:
    def number(value, spec):
        return "nan" if value is None else format(value, spec)

    text = (f"epoch {line['epoch']:>3}/{epochs}  train loss {number(line['train_loss'], '.4f')}  "
            f"test loss {number(line['test_loss'], '.4f')}")
    if line["test_accuracy"] is not None:
        text += f"  test acc {100 * line['test_accuracy']:.2f}%"
    if line.get("epsilon") is not None:
        text += f"  epsilon {line['epsilon']:.3g}"
    text += f"  {line['seconds']:.2f} s  {line['steps_per_second']:.0f} steps/s"
    return text + (f"  skipped {line['skipped']}" if line["skipped"] else "")
