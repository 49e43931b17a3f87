"""Smoke test of ``fbp bench --quick`` as a new user meets it, and of the harness's parts.

One quick run (module fixture) from a fresh working directory, with Flax,
Equinox and JAX-Privacy made unimportable: it must print its tables once, judge no target,
name each skipped peer with the reason, and write only under ``--out``. No
timing is asserted here (timings belong in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import fbp
from fbp import bench, cli
from fbp.bench import configs, targets, variants

ROOT = Path(__file__).resolve().parent.parent
FBP_ROWS = ("raw-jax", "raw-jax scan", "fbp manual", "fbp default", "fbp autodiff", "fbp custom_vjp",
            "fbp per_example", "fbp per_example + clip", "fbp per_example (vmap)", "fbp train_epoch (scan)",
            "fbp train_epoch (loop)", "matmuls only")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``fbp bench --quick`` from an empty cwd, no peer importable: (exit code, stdout, report, markdown, paths)."""
    root = tmp_path_factory.mktemp("bench")
    cwd, results = root / "cwd", root / "RESULTS.md"
    cwd.mkdir()
    results.write_text(f"old tables\n{bench.NOTES}\nkept notes\n")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for module in ("flax", "equinox", "jax_privacy"):  # None in sys.modules: as if not installed
            patch.setitem(sys.modules, module, None)
        with contextlib.redirect_stdout(stdout):
            code = cli.main(["bench", "--quick", "--rounds", "1", "--out", "out", "--results", str(results)])
    report = json.loads((cwd / "out" / "train_step.json").read_text())
    return {"code": code, "stdout": stdout.getvalue(), "report": report, "results": results.read_text(), "cwd": cwd}


def test_quick_run_measures_every_fbp_variant(quick_run):
    assert quick_run["code"] == 0
    (entry,) = quick_run["report"]["configs"]
    names = [row["variant"] for row in entry["rows"]]
    assert set(FBP_ROWS) <= set(names)
    for row in entry["rows"]:
        assert row["median_s"] > 0 and len(row["times_s"]) == 1
    assert entry["model_flops"] > 0 and entry["peak"]["flops_per_s"] > 0
    assert quick_run["report"]["environment"]["versions"]["jax"]


def test_quick_run_prints_its_tables_once(quick_run):
    out = quick_run["stdout"]
    assert out.count("## Targets") == 1
    assert out.count("| variant | ms/step |") == 1
    for name in FBP_ROWS:
        assert out.count(f"| {name} |") == 1, name
    assert "x manual" not in out  # the old per-row progress summary, a second copy of the table


def test_quick_run_judges_no_target(quick_run):
    report, out = quick_run["report"], quick_run["stdout"]
    names = {t["target"] for t in report["targets"]}
    assert {"fbp manual / raw-jax", "default step (guarded) / unguarded", "default step (guarded) / raw-jax",
            "per_example / batch step", "per_example + clip / batch step",
            "train_epoch (scan) / Python loop, per step", "train_epoch (scan) / raw-jax scan, per step",
            "fbp manual FLOP/s / matmul peak"} <= names
    assert quick_run["report"]["configs"][0]["epoch_strategy"] == "scan"  # an mlp on CPU
    assert all(t["met"] is None for t in report["targets"])
    start = out.index("## Targets")
    table = out[start:out.index("\n## ", start)]  # up to the next section
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and all(line.endswith("| n/a (smoke config) |") for line in rows)
    assert "| NO |" not in out and "| yes |" not in out


def test_quick_run_names_each_skipped_peer(quick_run):
    lines = quick_run["stdout"].splitlines()
    assert "skipped flax-nnx: flax is not installed (pip install flax)" in lines
    assert "skipped equinox: equinox is not installed (pip install equinox)" in lines
    assert "skipped jax-privacy: jax-privacy is not installed (pip install jax-privacy)" in lines
    assert set(quick_run["report"]["skipped"]) == {"flax-nnx", "equinox", "jax-privacy"}
    names = {row["variant"] for row in quick_run["report"]["configs"][0]["rows"]}
    assert not names & {"flax-nnx", "equinox", "jax-privacy"}
    assert "- Skipped flax-nnx: flax is not installed" in quick_run["results"]


def test_quick_run_writes_only_under_out(quick_run):
    cwd = quick_run["cwd"]
    written = {path.relative_to(cwd).as_posix() for path in cwd.rglob("*")}
    assert written == {"out", "out/train_step.json", "out/train_step.md"}
    assert "wrote out/train_step.json, out/train_step.md" in quick_run["stdout"]


def test_results_file_gets_the_tables_and_keeps_the_notes(quick_run):
    results = quick_run["results"]
    assert "## Targets" in results and "| raw-jax |" in results
    assert "old tables" not in results and results.endswith(f"{bench.NOTES}\nkept notes\n")


def test_default_out_is_a_folder_of_its_own_in_the_cwd():
    parser = bench.add_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).out == bench.DEFAULT_OUT == "fbp-bench"


def test_unwritable_out_fails_in_one_line_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["bench", "--quick", "--out", str(blocker / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("fbp bench: cannot create")
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "o"), "--results", str(tmp_path / "no" / "R.md")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--rounds", "0"], ["--round-seconds", "-1"], ["--config", "nope"]])
def test_bad_options_are_usage_errors(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *option])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_checkout_entry_point_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert "--quick" in result.stdout and str(ROOT / "benchmarks" / "out") in result.stdout.replace("\n", " ")


def test_peers_build_and_step_where_installed():
    pytest.importorskip("flax.nnx")
    pytest.importorskip("equinox")
    assert variants.skipped_peers() == {}
    cfg = bench.QUICK
    batches = variants.make_batches(cfg, *jax.random.split(jax.random.PRNGKey(0)))
    optimizer = optax.adam(1e-3)
    with jax.numpy_rank_promotion("allow"):  # their layers broadcast biases as their users write them
        for peer in variants.PEERS:
            variant = peer.build(cfg, optimizer, batches)
            variant.call()
            variant.block()


def test_jax_privacy_peer_steps_and_agrees_with_fbp_where_installed():
    """JAX-Privacy's row runs, and its clipped gradient equals fbp's on the first batch (float32 rounding)."""
    pytest.importorskip("jax_privacy", reason="JAX-Privacy is not installed (pip install jax-privacy)")
    cfg = bench.QUICK
    batches = variants.make_batches(cfg, *jax.random.split(jax.random.PRNGKey(0)))
    model = configs.fbp_model(cfg)
    params = model.init(jax.random.PRNGKey(1), batches[0][0])
    with jax.numpy_rank_promotion("allow"):
        for microbatch_size in (None, 2):
            variant = variants.jax_privacy_variant(cfg, params, optax.adam(1e-3), batches, microbatch_size)
            variant.call()
            variant.block()
            agreement = variants.jax_privacy_agreement(cfg, model, fbp.SoftmaxCrossEntropy(), params, batches[0],
                                                       microbatch_size)
            assert agreement["relative"] < 1e-5, agreement


def test_jax_privacy_rows_by_size():
    small, large = bench.CONFIGS[0], bench.CONFIGS[2]  # b32 (26k params), b1024 (670k params)
    assert variants.jax_privacy_microbatches(small, 26_122) == [None]
    assert variants.jax_privacy_microbatches(bench.CONFIGS[1], 669_706) == [None, 32]  # b128: 8.6e7 floats
    assert variants.jax_privacy_microbatches(large, 669_706) == [32]


def test_dp_table_and_target_against_jax_privacy():
    row = {"temp_bytes": 0, "peak_fraction": 0.5, "vs raw-jax": 1.0, "vs fbp manual": 1.0, "median_s": 0.001}
    times = {"raw-jax": 1.0, "fbp manual": 1.0, "fbp default": 1.0, "fbp per_example": 1.0,
             "fbp per_example + clip": 1.3, "jax-privacy": 40.0, "jax-privacy (microbatch 32)": 13.0}
    rows = [dict(row, variant=name, times_s=[t]) for name, t in times.items()]
    entry = {"config": {"name": bench.CONFIGS[1].name, "smoke": False}, "rows": rows,
             "jax_privacy_agreement": {"max_abs_difference": 1e-9, "relative": 2e-7}}
    judged = {t["target"]: t for t in targets.evaluate_targets([entry])}
    lead = judged["per_example + clip / JAX-Privacy clipped step (its fastest row)"]
    assert lead["met"] is True and lead["measured"] == pytest.approx(0.1)
    markdown = bench.to_markdown({"environment": {"date": "d", "backend": "cpu", "device": "cpu", "device_count": 1,
                                                  "machine": "m", "cpu_count": 2, "python": "3", "versions": {}},
                                  "command": "c", "peak_size": 8, "rounds": 1, "round_seconds": 0.1, "quick": True,
                                  "load_average": {"before": 0.1, "after": 0.1}, "configs": [], "targets": []})
    assert "## DP-SGD clipping" not in markdown  # no config: no table
    from fbp.bench.report import _dp_table

    table = "\n".join(_dp_table({"configs": [entry]}))
    assert "| mlp 784-512-512-10 b128 | 1.000 | 1.30x | 40.00x | 13.00x | 0.100 | 2.0e-07 |" in table
    assert "Opacus" in table


def test_targets_are_judged_on_full_runs_only():
    row = {"temp_bytes": 0, "times_s": [1.0], "peak_fraction": 0.9, "vs raw-jax": 1.0, "vs fbp manual": 1.0}
    names = ("raw-jax", "fbp manual", "fbp per_example", "fbp per_example + clip")
    rows = [dict(row, variant=name) for name in names]
    rows += [dict(row, variant="fbp default", times_s=[1.2]), dict(row, variant="raw-jax scan", times_s=[0.5]),
             dict(row, variant="fbp train_epoch (scan)", times_s=[0.9])]
    entry = {"config": {"name": bench.CONFIGS[0].name, "smoke": False}, "rows": rows, "epoch_strategy": "scan"}
    judged = {t["target"]: t["met"] for t in targets.evaluate_targets([entry])}
    assert judged["fbp manual / raw-jax"] is True and judged["default step (guarded) / unguarded"] is False
    assert judged["train_epoch (scan) / Python loop, per step"] is True  # 0.9 / 1.2: ratios within rounds
    assert judged["train_epoch (scan) / raw-jax scan, per step"] is False  # 0.9 / 0.5
    quick = targets.evaluate_targets([entry], judge=False)
    assert {targets.verdict(t) for t in quick} == {"n/a (--quick run)"}


def test_mixed_precision_config_reports_agreement_and_cost():
    row = {"temp_bytes": 0, "times_s": [2.0], "peak_fraction": 0.5, "vs raw-jax": 1.0, "vs fbp manual": 1.0}
    rows = [dict(row, variant=name) for name in ("raw-jax", "fbp manual", "fbp default", "fbp float32")]
    agreement = {"steps": 16, "float32_loss": 2.0, "loss": 2.01, "relative_gap": 0.005, "max_relative_gap": 0.01}
    entry = {"config": {"name": bench.BF16.name, "smoke": False, "precision": "bfloat16"}, "rows": rows,
             "precision": agreement, "backend": "cpu"}
    judged = {t["target"]: t for t in targets.evaluate_targets([entry])}
    assert judged["bfloat16 loss vs float32's, relative, after 16 steps"]["met"] is True
    assert targets.verdict(judged["bfloat16 step / float32 step"]) == "n/a (CPU: no bfloat16 matmul units, reported only)"
    assert bench.BF16.precision == "bfloat16" and bench.BF16.dtype == "float32" and bench.BF16.compute_dtype == "bfloat16"


@pytest.mark.parametrize("cfg", [bench.QUICK, bench.CONFIGS[-1]], ids=lambda cfg: cfg.name)
def test_raw_jax_floor_computes_the_fbp_model(cfg):
    """The raw-JAX row times the same function as fbp's rows: ``fbp.models.build``'s model, written in lax."""
    small_image = (8, 8, cfg.example_shape[-1]) if cfg.kind == "cnn" else cfg.example_shape
    cfg = dataclasses.replace(cfg, batch=2, example_shape=small_image)
    model = configs.fbp_model(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), cfg.input_shape)
    params = model.init(jax.random.PRNGKey(1), x)
    with jax.numpy_rank_promotion("allow"):
        raw = configs.raw_apply(cfg, [p for p in params if p], x)
    np.testing.assert_allclose(raw, model.apply(params, x), rtol=1e-5, atol=1e-5)


def test_matmul_flops_counts_dots_and_convolutions():
    def f(a, b, image, kernel):
        conv = lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (a @ b).sum() + conv.sum()

    flops = bench.matmul_flops(f, jnp.ones((4, 5)), jnp.ones((5, 6)), jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 7)))
    assert flops == 2 * 4 * 5 * 6 + 2 * (2 * 8 * 8 * 7) * (3 * 3 * 3)
