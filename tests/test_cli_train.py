"""``fbp train`` end to end: outputs, exit codes and messages, resume after SIGKILL, and the scripts."""

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fbp import data
from fbp.cli import main
from fbp.training import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train", "--model", "mlp:16", "--lr", "0.01", "--epochs", "2", "--batch-size", "64"]


def test_train_prints_epochs_and_writes_outputs(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "epoch   1/2  train loss" in captured.out and "done: test accuracy" in captured.out
    assert captured.err == ""  # not a terminal: no progress bar
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert checkpoint.latest(tmp_path / "checkpoints").name == "epoch_000002"
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_dp_train_states_its_mechanism_and_prints_epsilon(tmp_path, capsys):
    assert main([*TINY, "--per-example", "--clip-norm", "1", "--noise-multiplier", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DP-SGD: clip norm 1, noise multiplier 1, delta 0.0001 (the default: 1/N rounded down" in out
    assert "Poisson sampling: each of the 1438 examples joins a step with probability q = 64/1438" in out
    assert out.count("  epsilon ") == 2 and " at epsilon " in out.splitlines()[-1]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0 < lines[0]["epsilon"] < lines[1]["epsilon"]


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert "loss=" in capsys.readouterr().err  # tqdm's live loss


def test_resume_errors_name_the_folder(tmp_path, capsys):
    out = str(tmp_path)
    assert main([*TINY, "--out", out, "--resume"]) == 1
    assert f"no checkpoint folder {tmp_path / 'checkpoints'}" in capsys.readouterr().err

    assert main([*TINY, "--epochs", "1", "--out", out, "--quiet"]) == 0
    assert main([*TINY, "--model", "mlp:32", "--out", out, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "epoch_000001 was written for a different model" in err
    assert "params[1]['W']: (64, 16) float32 in the checkpoint, (64, 32) float32 here" in err

    victim = max((p for p in (tmp_path / "checkpoints").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:10])
    assert main([*TINY, "--out", out, "--resume"]) == 1
    assert "epoch_000001 is truncated or corrupt: state/" in capsys.readouterr().err


def test_mnist_from_idx_files_with_a_cnn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n in (("train", 64), ("t10k", 16)):
        data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,), np.uint8))
    args = ["train", "--data", "mnist", "--model", "cnn:4", "--epochs", "1", "--batch-size", "32", "--quiet"]
    assert main([*args, "--data-dir", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 2
    assert main([*args, "--out", str(tmp_path / "run")]) == 1
    assert "mnist: needs data_dir (--data-dir)" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_exit_1(tmp_path, capsys):
    # plain SGD at lr 100 on the regression set diverges to an infinite loss within a few steps
    args = ["train", "--data", "synthetic-regression", "--model", "mlp:8", "--optimizer", "sgd", "--lr", "100"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path)]) == 1
    assert "fbp train: non-finite loss at step" in capsys.readouterr().err
    assert checkpoint.latest(tmp_path / "checkpoints") is None


def test_check_gradients_prints_the_report(tmp_path, capsys):
    args = ["train", "--data", "synthetic-classification", "--model", "mlp:8", "--epochs", "1"]
    assert main([*args, "--check-gradients", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "finite-diff" in out and "per-example" in out and out.index("finite-diff") < out.index("epoch   1/1")


def test_devices_option_and_quiet(tmp_path, capsys):
    assert main([*TINY, "--epochs", "1", "--devices", "1", "--quiet", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # --quiet: nothing
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2 with the usage
        main([*TINY, "--devices", "3", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "devices must be >= 1 and divide batch_size 64" in capsys.readouterr().err


def _cli(out, *extra, env=None):
    # synthetic data: no scikit-learn import in each of the three processes
    command = [sys.executable, "-m", "fbp.cli", *TINY, "--data", "synthetic-classification", "--epochs", "3",
               "--quiet", "--out", str(out), *extra]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
    return subprocess.run(command, check=False, env=environment, capture_output=True, text=True, timeout=120)


# a DP run's resume (Poisson batches, calibrated noise) is bit-identical too: tests/test_dp_training.py
@pytest.mark.parametrize("extra", [[]], ids=["plain"])
def test_sigkill_during_save_then_resume_matches_an_uninterrupted_run(tmp_path, extra):
    assert _cli(tmp_path / "whole", *extra).returncode == 0
    killed = _cli(tmp_path / "crash", *extra, env={checkpoint.KILL_HOOK: "2"})  # dies after epoch 2's arrays
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert (checkpoints / "epoch_000002" / "state").is_dir()  # orbax committed, fbp's meta.json never came
    assert not (checkpoints / "epoch_000002" / checkpoint.META).exists()
    assert checkpoint.latest(checkpoints).name == "epoch_000001"

    resumed = _cli(tmp_path / "crash", *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = checkpoint.read_meta(checkpoint.latest(tmp_path / "whole" / "checkpoints"))
    crash = checkpoint.read_meta(checkpoint.latest(checkpoints))
    assert crash["epoch"] == whole["epoch"] == 3
    assert crash["sha256"] == whole["sha256"]  # params, optimizer state, step and key: bit-identical
    lines = (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # epoch 2 logged once, not twice


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train_mlp_digits.py", ["--epochs", "1"]),
        ("train_cnn_digits.py", ["--epochs", "1"]),
        ("regression_mse.py", ["--epochs", "2"]),
        ("compare_grad_modes.py", ["--epochs", "1"]),
        ("dp_tradeoff.py", ["--epochs", "1", "--noise", "2", "--seeds", "0"]),
    ],
)
def test_scripts_run(script, argv, tmp_path, monkeypatch, capsys):
    if script in ("compare_grad_modes.py", "dp_tradeoff.py"):
        argv = [*argv, "--out", str(tmp_path / "plot.png")]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    assert capsys.readouterr().out.strip()
    if script in ("compare_grad_modes.py", "dp_tradeoff.py"):
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_a_known_failure_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    assert main([*TINY, "--out", str(tmp_path), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fbp train: --resume: no checkpoint folder")
    assert main(["--debug", *TINY, "--out", str(tmp_path), "--resume"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("FBP_DEBUG", "1")
    assert main([*TINY, "--out", str(tmp_path), "--resume"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(tmp_path, capsys, monkeypatch):
    trainer = importlib.import_module("fbp.training.fit")  # the module: fbp.training.fit is also the function

    def broken(config):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(trainer, "fit", broken)
    assert main([*TINY, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == ("fbp train: unexpected RuntimeError: something inside broke; run again with "
                   "`fbp --debug train ...` for the traceback, and please report it\n")


def test_usage_errors_exit_2_with_the_subcommand_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fbp train") and "epochs must be a positive integer, got 0" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "usage: fbp train" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already at epoch 1 of 1: nothing to do" in out and "epoch   1/1" not in out
