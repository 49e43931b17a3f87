"""The targets fbp's train step is held to, each with its measured value and whether it is met.

A target is judged only on a config it speaks of, measured by a full run. A
``--quick`` run is a smoke test on a toy config: its targets are listed with
their values, so that the report has the same shape, but marked not applicable
(``met`` None) instead of "NO".

Ratios are medians over rounds of the ratio within each round (the variants of
a config run in the same rounds, so drift of a shared machine hits both alike).
"""

from __future__ import annotations

import statistics

from fbp.bench.configs import LARGE, SMALL

EPOCH_ROW = "fbp train_epoch"  # the rows "fbp train_epoch (scan)" and "fbp train_epoch (loop)"
CLIP_ROW = "fbp per_example + clip"
JAX_PRIVACY = "jax-privacy"  # the rows "jax-privacy" and "jax-privacy (microbatch 32)"


def jax_privacy_rows(rows: dict) -> list[str]:
    """The names of a config's JAX-Privacy rows (none when JAX-Privacy is not installed)."""
    return [name for name in rows if name == JAX_PRIVACY or name.startswith(f"{JAX_PRIVACY} (")]


def ratio(rows: dict, name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time per step over ``reference``'s in the same round."""
    return statistics.median(t / r for t, r in zip(rows[name]["times_s"], rows[reference]["times_s"]))


def evaluate_targets(configs: list[dict], *, judge: bool = True) -> list[dict]:
    """The targets of each measured config.

    Args:
      configs: the report's config entries (``{"config": {...}, "rows": [...], "epoch_strategy": ...}``).
      judge: False for a ``--quick`` run: every target gets ``met: None``.

    Returns:
      ``{"target", "config", "measured", "goal", "met"}`` per target; ``met`` is True, False, or None
      when the target does not apply, with ``"not_judged"`` saying why ("smoke config", "--quick run", ...).
    """
    targets = []

    def add(target, entry, value, goal, met, not_judged=None):
        row = {"target": target, "config": entry["config"]["name"], "measured": value, "goal": goal, "met": bool(met)}
        if entry["config"].get("smoke", False) or not judge:
            not_judged = "smoke config" if entry["config"].get("smoke", False) else "--quick run"
        if not_judged:
            row.update(met=None, not_judged=not_judged)
        targets.append(row)

    for entry in configs:
        name, smoke = entry["config"]["name"], entry["config"].get("smoke", False)
        mixed = entry["config"].get("precision", "float32") != "float32"
        rows = {row["variant"]: row for row in entry["rows"]}
        manual = rows["fbp manual"]
        add("fbp manual / raw-jax", entry, manual["vs raw-jax"], "<= 1.02", manual["vs raw-jax"] <= 1.02)
        guarded = ratio(rows, "fbp default", "fbp manual")
        add("default step (guarded) / unguarded", entry, guarded, "<= 1.05", guarded <= 1.05)
        default = ratio(rows, "fbp default", "raw-jax")
        add("default step (guarded) / raw-jax", entry, default, "<= 1.02", default <= 1.02)
        strategy = entry.get("epoch_strategy")
        epoch_row = f"{EPOCH_ROW} ({strategy})"
        if epoch_row in rows:
            epoch = ratio(rows, epoch_row, "fbp default")
            add(f"train_epoch ({strategy}) / Python loop, per step", entry, epoch, "<= 1.0", epoch <= 1.0)
        if not mixed:
            pe = rows["fbp per_example"]
            add("per_example / batch step", entry, pe["vs fbp manual"], "<= 1.10", pe["vs fbp manual"] <= 1.10)
            if pe["temp_bytes"] is not None and manual["temp_bytes"] is not None:
                more = pe["temp_bytes"] - manual["temp_bytes"]
                add("per_example temp memory - batch step's (bytes)", entry, more, "<= 0", more <= 0)
            clip = rows["fbp per_example + clip"]
            add("per_example + clip / batch step", entry, clip["vs fbp manual"], "<= 1.5",
                clip["vs fbp manual"] <= 1.5)
            peers = jax_privacy_rows(rows)
            if peers:  # against JAX-Privacy's fastest row: keep the lead (issue 17)
                value = max(ratio(rows, CLIP_ROW, peer) for peer in peers)  # the fastest peer: the largest
                add("per_example + clip / JAX-Privacy clipped step (its fastest row)", entry, value, "< 1", value < 1)
        if name == SMALL or smoke:  # a smoke run lists every target on its only config
            for other in ("flax-nnx", "equinox"):
                if other in rows:
                    value = ratio(rows, "fbp manual", other)
                    add(f"fbp manual / {other}", entry, value, "< 1", value < 1)
            if epoch_row in rows:
                value = ratio(rows, epoch_row, "raw-jax scan")
                add(f"train_epoch ({strategy}) / raw-jax scan, per step", entry, value, "<= 1.05", value <= 1.05)
        if name == LARGE or smoke:
            add("fbp manual FLOP/s / matmul peak", entry, manual["peak_fraction"], ">= 0.85",
                manual["peak_fraction"] >= 0.85)
        if mixed:
            agreement = entry["precision"]
            add(f"{entry['config']['precision']} loss vs float32's, relative, after {agreement['steps']} steps",
                entry, agreement["relative_gap"], "<= 0.02", agreement["relative_gap"] <= 0.02)
            cost = ratio(rows, "fbp manual", "fbp float32")
            on_cpu = entry.get("backend", "cpu") == "cpu"
            add(f"{entry['config']['precision']} step / float32 step", entry, cost, "< 1", cost < 1,
                not_judged="CPU: no bfloat16 matmul units, reported only" if on_cpu else None)
    return targets


def verdict(target: dict) -> str:
    """The table's "met" cell: yes, NO, or not applicable."""
    if target["met"] is None:
        return f"n/a ({target.get('not_judged', 'not judged')})"
    return "yes" if target["met"] else "NO"
