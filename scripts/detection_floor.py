"""The smallest relative error in one leaf's gradient that fbp.check_gradients detects, per dtype.

Plants dW <- (1 + delta) dW in one Dense layer of a few small models and, for
delta = 10^0, 10^-0.5, 10^-1, ... down to 1e-12, reports the smallest delta
detected, overall and by each witness (which one sets the floor), and whether
some larger delta was missed (a gap: the floor would then be a fluke).

    python scripts/detection_floor.py                 # all dtypes, all models
    python scripts/detection_floor.py --dtype float32 --seeds 3 --model mlp
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

import fbp

DTYPES = ("float64", "float32", "bfloat16")
DELTAS = [10.0 ** (-k / 2) for k in range(25)]  # 1 ... 1e-12 in half decades


@dataclasses.dataclass(frozen=True)
class ScaledDense(fbp.Dense):
    """Dense whose dW is multiplied by (1 + delta)."""

    delta: float = 0.0

    def backward(self, params, x, dy):
        dparams, dx = super().backward(params, x, dy)
        return {**dparams, "W": dparams["W"] * (1 + self.delta)}, dx


def models(delta: float) -> dict:
    """name -> (model, input shape); the planted error is in the last Dense."""
    return {
        "mlp": (fbp.Sequential([fbp.Dense(8), fbp.Tanh(), ScaledDense(3, delta=delta)]), (6,)),
        "layernorm-mlp": (
            fbp.Sequential([fbp.Dense(8), fbp.LayerNorm(), fbp.GELU(), ScaledDense(3, delta=delta)]),
            (6,),
        ),
        "cnn": (
            fbp.Sequential([fbp.Conv2D(3), fbp.ReLU(), fbp.MaxPool2D(2), fbp.Flatten(), ScaledDense(3, delta=delta)]),
            (6, 6, 2),
        ),
    }


def failing_witnesses(name: str, dtype: str, delta: float, seed: int) -> set[str]:
    """The witnesses ("autodiff", "finite-diff", "per-example") that flag the planted error."""
    model, shape = models(delta)[name]
    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(key_x, (4, *shape), dtype)
    y = jax.random.randint(key_y, (4,), 0, 3)
    params = model.init(key_params, x)
    report = fbp.check_gradients(model, fbp.SoftmaxCrossEntropy(), params, x, y, locate=False, seed=seed)
    return {row.check for row in report.failures}


def scan(name: str, dtype: str, seed: int) -> tuple[dict[str, float], bool]:
    """({witness or "any": smallest delta it flagged}, whether a delta above that went undetected).

    Stops after three undetected deltas in a row.
    """
    floors, missed, misses_in_a_row = {}, [], 0
    for delta in DELTAS:
        failed = failing_witnesses(name, dtype, delta, seed)
        for witness in failed | ({"any"} if failed else set()):
            floors[witness] = delta  # deltas decrease: the last one flagged is the smallest
        missed += [] if failed else [delta]
        misses_in_a_row = 0 if failed else misses_in_a_row + 1
        if misses_in_a_row == 3:
            break
    return floors, any(delta > floors.get("any", float("inf")) for delta in missed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="default: all")
    parser.add_argument("--model", choices=tuple(models(0.0)), action="append", help="default: all")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per model (default 2)")
    args = parser.parse_args()
    columns = ("any", "autodiff", "finite-diff", "per-example")
    print(f"{'dtype':9} {'model':14} {'seed':>4} " + " ".join(f"{c:>11}" for c in columns) + "  gap")
    for dtype in args.dtype or DTYPES:
        with jax.enable_x64(dtype == "float64"):
            worst = 0.0
            for name in args.model or models(0.0):
                for seed in range(args.seeds):
                    floors, gap = scan(name, dtype, seed)
                    worst = max(worst, floors.get("any", float("inf")))
                    cells = " ".join(f"{floors[c]:>11.2g}" if c in floors else f"{'-':>11}" for c in columns)
                    print(f"{dtype:9} {name:14} {seed:>4} {cells}  {gap}", flush=True)
            print(f"{dtype}: every planted error >= {worst:.2g} was detected, in every model and seed\n", flush=True)


if __name__ == "__main__":
    main()
