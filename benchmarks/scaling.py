"""Data-parallel scaling: train steps per second on meshes of 1, 2, 4 and 8 devices.

    python -m benchmarks.scaling                          # devices 1,2,4,8; on a CPU, forced CPU devices
    python -m benchmarks.scaling --devices 1,2 --grad autodiff --per-example --clip-norm 1.0
    python -m benchmarks.scaling --out benchmarks/out     # also write scaling.json and scaling.md

Two tables. Strong scaling: the same global batch split over more devices;
ideal is ``n`` times the steps/s of one device (efficiency = speedup / n).
Weak scaling: the same batch per device, so the global batch grows with ``n``;
ideal is constant steps/s (efficiency = steps/s(n) / steps/s(1)). The "no mesh"
row is ``make_train_step(mesh=None)``, the single-device path, for the overhead
of the mesh path itself.

On a CPU the devices are forced (``jax_num_cpu_devices``, set here before JAX
starts) and share the machine's cores: there the table measures the overhead of
sharding and the all-reduce, not a speedup. Real scaling needs real devices
(GPUs or TPUs), where the same command runs unchanged.

Method: each variant is compiled and warmed up, then rounds run the variants
in turn (rotating the order); one measurement is ``k`` steps dispatched back to
back then ``jax.block_until_ready``, ``k`` calibrated to ``--round-seconds``.
Reported: the median over rounds, and min-max as a percentage of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

import fbp
from fbp import models, parallel


def _parse_devices(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of device counts like 1,2,4,8, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"device counts must be >= 1, got {text!r}")
    return sorted(set(counts))


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) < 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected inputs,hidden...,classes like 784,512,512,10, got {text!r}")
    return widths


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser.add_argument("--devices", type=_parse_devices, default=[1, 2, 4, 8], help="device counts (default 1,2,4,8)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch of the strong-scaling table (default 1024)")
    parser.add_argument("--per-device-batch", type=int, default=128,
                        help="batch per device of the weak-scaling table (default 128)")
    parser.add_argument("--widths", type=_parse_widths, default="784,512,512,10",
                        help="MLP widths: inputs, hidden..., classes (default 784,512,512,10)")
    parser.add_argument("--grad", default="manual", choices=("manual", "autodiff", "custom_vjp"))
    parser.add_argument("--per-example", action="store_true", help="per-example gradients")
    parser.add_argument("--clip-norm", type=float, help="with --per-example: clip each example's gradient (DP-SGD)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--round-seconds", type=float, default=0.5, help="time per variant per round (default 0.5)")
    parser.add_argument("--out", help="folder to write scaling.json and scaling.md into")
    return parser


def _force_cpu_devices(count: int) -> None:
    """Give the CPU backend ``count`` devices; must run before JAX starts its backends."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", count)


class Variant:
    """One compiled step with its own state and pre-placed batch."""

    def __init__(self, label: str, devices: int | None, batch: int, args: argparse.Namespace):
        widths = args.widths
        hidden = ",".join(str(w) for w in widths[1:-1])
        model = models.build(f"mlp:{hidden}", input_shape=(widths[0],), num_outputs=widths[-1])
        optimizer = optax.adam(1e-3)
        kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, (batch, widths[0]))
        y = jax.random.randint(ky, (batch,), 0, widths[-1])
        mesh = None if devices is None else parallel.make_mesh(devices)
        self.step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, grad=args.grad,
                                        per_example=args.per_example, clip_norm=args.clip_norm, mesh=mesh)
        self.state = fbp.TrainState.create(model.init(kp, x), optimizer)
        if mesh is not None:  # placed once, as a data loader would; the step then only checks the shardings
            x, y = parallel.shard_batch(mesh, x), parallel.shard_batch(mesh, y)
        self.x, self.y = x, y
        self.label, self.devices, self.batch = label, devices or 1, batch
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.samples: list[float] = []

    def run(self, calls: int) -> float:
        """Seconds for ``calls`` steps, dispatched back to back."""
        start = time.perf_counter()
        for _ in range(calls):
            self.state, _ = self.step(self.state, self.x, self.y)
        jax.block_until_ready(self.state)
        return time.perf_counter() - start


def _measure(variants: list[Variant], rounds: int, round_seconds: float) -> None:
    calls = {}
    for variant in variants:  # warm up, then calibrate
        variant.run(5)
        per_step = variant.run(5) / 5
        calls[variant.label] = max(1, round(round_seconds / per_step))
    for r in range(rounds):
        for variant in variants[r % len(variants):] + variants[: r % len(variants)]:
            k = calls[variant.label]
            variant.samples.append(k / variant.run(k))


def _rows(variants: list[Variant], strong: bool) -> list[dict]:
    base = next(v for v in variants if v.label == "1")
    base_rate = statistics.median(base.samples)
    rows = []
    for v in variants:
        rate = statistics.median(v.samples)
        speedup = rate / base_rate if strong else rate * v.batch / (base_rate * base.batch)
        rows.append({
            "devices": v.label, "global_batch": v.batch, "per_device_batch": v.batch // v.devices,
            "steps_per_s": rate, "spread": f"{100 * min(v.samples) / rate:.0f}-{100 * max(v.samples) / rate:.0f}%",
            "examples_per_s": rate * v.batch, "speedup": speedup,
            "efficiency": speedup / v.devices, "compile_s": v.compile_s,
        })
    return rows


def _markdown(title: str, rows: list[dict]) -> str:
    lines = [f"**{title}**", "",
             "| devices | global batch | per device | steps/s (min-max) | examples/s | speedup | efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['global_batch']} | {r['per_device_batch']} | {r['steps_per_s']:.1f} "
            f"({r['spread']}) | {r['examples_per_s']:.0f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Build, time and print both tables; write them to ``--out`` if given."""
    _force_cpu_devices(max(args.devices))
    available = jax.device_count()
    if max(args.devices) > available:
        raise SystemExit(f"scaling: asked for {max(args.devices)} devices, {available} visible")
    if args.batch % max(args.devices):
        raise SystemExit(f"scaling: --batch {args.batch} must divide by every device count {args.devices}")
    device = jax.devices()[0]
    header = (
        f"{device.platform} ({device.device_kind}), {available} devices, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, python {platform.python_version()}; MLP {','.join(map(str, args.widths))}, Adam, grad={args.grad}"
        + (", per-example" if args.per_example else "") + (f", clip_norm={args.clip_norm}" if args.clip_norm else "")
    )
    print(header, flush=True)
    tables = {}
    for strong in (True, False):
        variants = []
        for devices in [None, *args.devices]:
            batch = args.batch if strong else args.per_device_batch * (devices or 1)
            variants.append(Variant("no mesh" if devices is None else str(devices), devices, batch, args))
        _measure(variants, args.rounds, args.round_seconds)
        title = (f"Strong scaling: global batch {args.batch}" if strong
                 else f"Weak scaling: {args.per_device_batch} examples per device")
        tables[title] = _rows(variants, strong)
        print("\n" + _markdown(title, tables[title]) + "\n", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps({"setup": header, "tables": tables}, indent=1))
        (out / "scaling.md").write_text(header + "\n\n" + "\n\n".join(_markdown(t, r) for t, r in tables.items()) + "\n")
        print(f"wrote {out / 'scaling.json'} and {out / 'scaling.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
