"""The benchmark's report: the environment a result needs to be read later, the markdown tables, RESULTS.md.

``to_markdown`` turns the report (what ``train_step.json`` holds) into the
tables; ``write_results`` rewrites a results file such as benchmarks/RESULTS.md
with new tables while keeping its hand-written notes (everything from the
``NOTES`` heading on).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path

import jax

import fbp
from fbp.bench.targets import CLIP_ROW, jax_privacy_rows, ratio, verdict

NOTES = "## Notes (hand-written)"  # kept when --results rewrites the file: the tables change, the reading stays
BUSY_HOST = (
    "- **The host was busy** (load average above its core count): other work shared the cores, so times "
    "and spreads are noisy; ratios within rounds suffer less"
)
NO_ACCELERATOR = (
    "- No GPU or TPU was visible to JAX: the bfloat16 config ran on the CPU, for its correctness and cost "
    "(XLA:CPU has no bfloat16 matmul units), not for its speed"
)


def _cpu_model() -> str:
    """The CPU's model name where Linux tells it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> float | None:
    """The host's 1-minute load average (other work competing for the cores), where the OS tells it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment() -> dict:
    """Device, versions, date: what a result needs to be read later."""
    device = jax.devices()[0]

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": jax.default_backend(),
        "device": device.platform if device.device_kind == device.platform else f"{device.platform} {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} {_cpu_model()}".strip(),
        "python": platform.python_version(),
        "versions": {**{p: version(p) for p in ("jax", "jaxlib", "optax", "flax", "equinox", "jax-privacy")},
                     "fbp": fbp.__version__},
    }


def _header(report: dict) -> list[str]:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    skipped = report.get("skipped", {})
    return [
        "# Train-step benchmark",
        "",
        f"- Date: {env['date']}; command: `{report['command']}`",
        (
            f"- Device: {env['device']} (backend {env['backend']}, {env['device_count']} device(s)); "
            f"host: {env['machine']}, {env['cpu_count']} CPU cores; Python {env['python']}"
        ),
        f"- Versions: {versions}",
        (
            f"- Matmul peak: a {report['peak_size']}x{report['peak_size']} matmul in the config's compute dtype, timed "
            "in the same rounds as each config's steps (its GFLOP/s heads each table)"
        ),
        (
            f"- {report['rounds']} interleaved rounds of about {report['round_seconds']} s per variant; host "
            f"load average {report['load_average']['before']} before, {report['load_average']['after']} after"
        ),
        *([BUSY_HOST] if max(filter(None, report["load_average"].values()), default=0) > env["cpu_count"] else []),
        *([NO_ACCELERATOR] if env["backend"] == "cpu" and not report.get("quick") else []),
        *[f"- Skipped {name}: {reason}" for name, reason in skipped.items()],
        *(["- A --quick run is a smoke test: its targets are listed but not judged"] if report.get("quick") else []),
    ]


def _targets_table(report: dict) -> list[str]:
    lines = ["## Targets", "", "| target | config | measured | goal | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        value = t["measured"]
        shown = f"{value / 2**20:+.2f} MiB" if "bytes" in t["target"] else f"{value:.4f}"
        lines.append(f"| {t['target']} | {t['config']} | {shown} | {t['goal']} | {verdict(t)} |")
    return lines


def _config_table(entry: dict) -> list[str]:
    cfg = entry["config"]
    lines = [
        f"## {cfg['name']}",
        "",
        (
            f"{entry['num_params']:,} parameters, {entry['model_flops'] / 1e6:.1f} MFLOP per step "
            f"(matmul/conv FLOPs of the raw-JAX gradient), dtype {cfg['dtype']}{_compute(cfg)}; matmul peak "
            f"{entry['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s in the same rounds."
        ),
        *_config_facts(entry),
        "",
        "| variant | ms/step | spread | vs raw-jax | vs fbp manual | steps/s | compile s | temp MiB | GFLOP/s | % peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in entry["rows"]:
        median = row["median_s"]
        spread = f"-{(1 - row['min_s'] / median) * 100:.0f}/+{(row['max_s'] / median - 1) * 100:.0f}%"
        temp = "n/a" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.2f}"
        lines.append(
            f"| {row['variant']} | {median * 1e3:.3f} | {spread} | {row['vs raw-jax']:.2f}x "
            f"| {row['vs fbp manual']:.2f}x | {row['steps_per_s']:.0f} | {row['compile_s']:.2f} "
            f"| {temp} | {row['flops_per_s'] / 1e9:.1f} | {row['peak_fraction'] * 100:.0f} |"
        )
    return lines


def _compute(cfg: dict) -> str:
    precision = cfg.get("precision", "float32")
    return "" if precision == "float32" else f" (compute in {precision})"


def _config_facts(entry: dict) -> list[str]:
    """What the table alone does not say: the epoch strategy picked here, a mixed precision's agreement."""
    lines = []
    if entry.get("epoch_strategy"):
        lines += ["", (f"`train_epoch` picks `{entry['epoch_strategy']}` here (`fbp.training.epoch_strategy`); "
                       "its rows run the default (guarded) step, as `fbp train` does.")]
    if entry.get("precision"):
        agreement, precision = entry["precision"], entry["config"]["precision"]
        lines += ["", (f"Precision `{precision}` (float32 params and optimizer state): after {agreement['steps']} "
                       f"steps from the same start its loss is {agreement['loss']:.4f} against float32's "
                       f"{agreement['float32_loss']:.4f} (mean of the last quarter; relative gap "
                       f"{agreement['relative_gap']:.4f}, largest per-step gap {agreement['max_relative_gap']:.4f}).")]
    return lines


OPACUS_CONTEXT = (
    "For context, not measured here: Opacus, PyTorch's DP-SGD library, reports its private training at 2.6x to "
    "8x the time of non-private training (Yousefpour et al. 2021, *Opacus: user-friendly differential privacy "
    "library in PyTorch*, on a GPU)."
)


def _dp_table(report: dict) -> list[str]:
    """DP-SGD's clipping, per config: fbp's clipped step and JAX-Privacy's against the non-private raw-JAX step."""
    entries = [entry for entry in report["configs"] if any(
        row["variant"] == CLIP_ROW for row in entry["rows"])]
    if not entries:
        return []
    lines = [
        "## DP-SGD clipping: fbp and JAX-Privacy",
        "",
        ("Each a clipped step (clip norm 1, no noise) + Adam, on the same batches, against the non-private raw-JAX "
         "step in the same rounds (median of per-round ratios). fbp: ghost clipping through the hand-written "
         "backward (`make_train_step(per_example=True, clip_norm=1)`); JAX-Privacy: `jax_privacy.clipped_grad` "
         "(jax.vmap of per-example `jax.grad` of the raw-JAX model), plain and with `microbatch_size=32`. "
         "Agreement: the largest difference of the two clipped gradients on the first batch, relative to its "
         "largest element. " + OPACUS_CONTEXT),
        "",
        ("| config | raw-jax ms/step | fbp clip / raw-jax | JAX-Privacy / raw-jax "
         "| JAX-Privacy (microbatch 32) / raw-jax | fbp / JAX-Privacy (fastest) | agreement |"),
        "|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        rows = {row["variant"]: row for row in entry["rows"]}
        peers = jax_privacy_rows(rows)

        def cell(name, rows=rows):
            return f"{ratio(rows, name, 'raw-jax'):.2f}x" if name in rows else "n/a"

        microbatched = next((peer for peer in peers if peer != "jax-privacy"), None)
        lead = f"{max(ratio(rows, CLIP_ROW, peer) for peer in peers):.3f}" if peers else "n/a"
        agreement = entry.get("jax_privacy_agreement")
        agreed = "n/a" if agreement is None else f"{agreement['relative']:.1e}"
        lines.append(
            f"| {entry['config']['name']} | {rows['raw-jax']['median_s'] * 1e3:.3f} | {cell(CLIP_ROW)} "
            f"| {cell('jax-privacy')} | {cell(microbatched) if microbatched else 'n/a'} | {lead} | {agreed} |"
        )
    return lines


def to_markdown(report: dict) -> str:
    """The report as markdown: environment, targets, DP-SGD's clipping against JAX-Privacy, one table per config."""
    lines = [*_header(report), "", *_targets_table(report)]
    dp = _dp_table(report)
    if dp:
        lines += ["", *dp]
    for entry in report["configs"]:
        lines += ["", *_config_table(entry)]
    return "\n".join(lines) + "\n"


def write_results(markdown: str, path: str | Path) -> None:
    """Write ``markdown`` to ``path``, keeping the file's ``NOTES`` section (and all after it) if it has one."""
    path = Path(path)
    notes = path.read_text().partition(NOTES)[2] if path.is_file() else ""
    path.write_text(markdown + (f"\n{NOTES}{notes}" if notes else ""))
