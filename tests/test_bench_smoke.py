"""Smoke test of the benchmark harness: ``--quick`` runs end to end and writes its files.

No timing is asserted here (timings belong in benchmarks/RESULTS.md); this only
checks that every variant runs and that the report has the shape readers rely on.
"""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import train_step
from fbp import cli


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = out / "RESULTS.md"
    results.write_text(f"old tables\n{train_step.NOTES}\nkept notes\n")
    # the raw-JAX, Flax and Equinox models broadcast biases as users write them
    with jax.numpy_rank_promotion("allow"):
        assert cli.main(["bench", "--quick", "--rounds", "1", "--out", str(out), "--results", str(results)]) == 0
    return json.loads((out / "train_step.json").read_text()), results.read_text()


def test_quick_run_measures_every_variant(quick_report):
    report, _ = quick_report
    (entry,) = report["configs"]
    names = [row["variant"] for row in entry["rows"]]
    for expected in ("raw-jax", "fbp manual", "fbp autodiff", "fbp custom_vjp", "fbp per_example",
                     "fbp per_example + clip", "fbp per_example (vmap)", "fbp train_epoch"):
        assert expected in names
    for row in entry["rows"]:
        assert row["median_s"] > 0 and len(row["times_s"]) == 1
    assert entry["model_flops"] > 0 and entry["peak"]["flops_per_s"] > 0
    assert report["environment"]["versions"]["jax"]


def test_quick_run_reports_targets(quick_report):
    report, markdown = quick_report
    targets = {t["target"] for t in report["targets"]}
    assert {"fbp manual / raw-jax", "per_example / batch step", "per_example + clip / batch step",
            "train_epoch steps/s / Python loop's", "fbp manual FLOP/s / matmul peak"} <= targets
    assert "## Targets" in markdown and "| raw-jax |" in markdown
    assert "old tables" not in markdown and markdown.endswith(f"{train_step.NOTES}\nkept notes\n")


def test_matmul_flops_counts_dots_and_convolutions():
    import jax.numpy as jnp
    from jax import lax

    def f(a, b, image, kernel):
        conv = lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (a @ b).sum() + conv.sum()

    flops = train_step.matmul_flops(f, jnp.ones((4, 5)), jnp.ones((5, 6)), jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 7)))
    assert flops == 2 * 4 * 5 * 6 + 2 * (2 * 8 * 8 * 7) * (3 * 3 * 3)
