"""``fbp check``: the table, the options, and a non-zero exit on a wrong backward."""

import jax.numpy as jnp
import pytest
from registry import WrongTanh

from fbp import MSE, Dense, Sequential, zoo
from fbp.cli import main

SMALL = "mlp-tanh/mse"


def test_check_one_model_prints_the_table_and_returns_0(capsys):
    assert main(["check", "--model", SMALL, "--dtype", "float32", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split() == ["model", "loss", "dtype", "rows", "worst", "rel", "err", "result"]
    assert row.split()[:3] == ["mlp-tanh", "MSE", "float32"] and row.split()[-1] == "ok"
    assert "all 1 checks ok" in out


def test_model_option_takes_a_comma_list_and_repeats(capsys):
    assert main(["check", "--model", "mlp-tanh/mse,mlp-sigmoid/bce", "--model", SMALL, "--dtype", "float32"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:3]
    assert [row.split()[0] for row in rows] == ["mlp-sigmoid", "mlp-tanh"]  # zoo order, no duplicates


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--dtype", "float32", "float64", "both", "--seed", "--model", "--list"):
        assert text in out


def test_list_names_every_zoo_entry(capsys):
    assert main(["check", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(zoo.ZOO)


def test_unknown_model_returns_2(capsys):
    assert main(["check", "--model", "no-such-model"]) == 2
    assert "no zoo model 'no-such-model'" in capsys.readouterr().err


def test_wrong_backward_fails_and_prints_the_report(capsys, monkeypatch):
    broken = zoo.ZooEntry(
        Sequential([Dense(4), WrongTanh(), Dense(2)]), MSE(), zoo.ZOO[SMALL].make_x, zoo.ZOO[SMALL].make_y
    )
    monkeypatch.setitem(zoo.ZOO, "broken/mse", broken)
    assert main(["check", "--model", "broken", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[-1] == "FAIL"
    assert "1 of 1 checks FAILED" in out
    assert "first wrong layer: [1] WrongTanh()" in out  # the full report names the planted bug


def test_zoo_examples_follow_the_dtype(x64):
    _, _, params, x, _ = zoo.ZOO["embedding/cross-entropy"].example(dtype=jnp.float64)
    assert params[0]["W"].dtype == jnp.float64 and jnp.issubdtype(x.dtype, jnp.integer)


def test_rows_appear_as_each_check_finishes(capsys, monkeypatch):
    from fbp.commands import check as command

    seen_before_each_check = []
    real = command._check_one

    def recording(entry, dtype, seed):
        seen_before_each_check.append(capsys.readouterr().out)  # what the user had on screen so far
        return real(entry, dtype, seed)

    monkeypatch.setattr(command, "_check_one", recording)
    assert main(["check", "--model", "mlp-tanh/mse,mlp-sigmoid/bce", "--dtype", "float32"]) == 0
    first, second = seen_before_each_check
    assert first.split()[:3] == ["model", "loss", "dtype"]  # the header before the first check ends
    assert second.split()[-1] == "ok" and "mlp-sigmoid" in second  # the first row before the second check


def test_unknown_option_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--no-such-option"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fbp check") and "unrecognized arguments: --no-such-option" in err
