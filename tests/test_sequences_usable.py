"""Sequence data, sequence model specs, ``fbp train`` on them and ``fbp generate``: small and fast."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import data, models
from fbp.cli import main

TEXT = "def add(a, b):\n    return a + b\n\n" * 40  # 1,320 characters, 16 distinct


# --- data ------------------------------------------------------------------------------------------


def test_digits_rows_are_the_digits_split_row_by_row():
    rows, images = data.load("digits-rows"), data.load("digits")
    assert rows.x_train.shape == (1438, 8, 8) and rows.x_test.shape == (359, 8, 8)
    np.testing.assert_array_equal(rows.x_train, images.x_train[..., 0])  # the same split
    np.testing.assert_array_equal(rows.y_test, images.y_test)
    assert rows.num_classes == 10 and not rows.per_step


def test_adding_problem_marks_one_step_per_half_and_sums_them():
    ds = data.adding_problem(jax.random.PRNGKey(0), num_examples=400, length=10)
    assert ds.x_train.shape == (320, 10, 2) and ds.y_train.shape == (320, 1) and ds.num_classes is None
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    markers = x[..., 1]
    assert np.all(markers[:, :5].sum(axis=1) == 1) and np.all(markers[:, 5:].sum(axis=1) == 1)
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * markers).sum(axis=1), rtol=1e-6)
    # answering the mean scores about 1/6: the variance of a sum of two U(0, 1)
    assert abs(np.var(y) - data.ADDING_BASELINE_MSE) < 0.03
    again = data.adding_problem(jax.random.PRNGKey(0), num_examples=400, length=10)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_default_adding_problem_is_length_50():
    ds = data.load("adding")
    assert ds.input_shape == (50, 2) and ds.num_outputs == 1
    with pytest.raises(ValueError, match="length must be >= 2"):
        data.adding_problem(jax.random.PRNGKey(0), length=1)


def test_copy_task_asks_for_the_symbols_after_the_delimiter():
    ds = data.copy_task(jax.random.PRNGKey(0), num_examples=50, symbols=4, copy_length=3, delay=5)
    assert ds.x_train.shape == (40, 11, 6) and ds.y_train.shape == (40, 11) and ds.num_classes == 6
    assert ds.per_step
    ids = ds.x_train.argmax(-1)
    assert np.all(ds.x_train.sum(-1) == 1)  # one-hot
    assert np.all((ids[:, :3] >= 1) & (ids[:, :3] <= 4))  # the symbols
    assert np.all(ids[:, 7] == 5) and np.all(np.delete(ids, [0, 1, 2, 7], axis=1) == 0)  # delimiter, blanks
    np.testing.assert_array_equal(ds.y_train[:, -3:], ids[:, :3])
    assert np.all(ds.y_train[:, :-3] == 0)
    assert data.copy_baseline_cross_entropy(4, 3, 5) == pytest.approx(3 * math.log(4) / 11)


def test_text_windows_predict_the_next_character():
    ds = data.text_dataset(TEXT, window=8, validation_fraction=0.25)
    assert ds.per_step and ds.num_classes == len(ds.vocabulary) + 1
    assert ds.vocabulary == "".join(sorted(set(TEXT)))
    assert ds.x_train.shape == ((990 - 1) // 8, 8) and ds.x_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train[:, :-1], ds.x_train[:, 1:])
    assert data.decode(ds.x_train[0], ds.vocabulary) + data.decode(ds.x_train[1], ds.vocabulary) == TEXT[:16]
    assert data.decode(ds.x_test[0], ds.vocabulary) == TEXT[990:998]  # validation: the end of the text


def test_text_characters_missing_from_training_are_unknown():
    ds = data.text_dataset("ab" * 60 + "abc" * 10, window=4, validation_fraction=0.2)
    assert ds.vocabulary == "ab"
    assert 2 in ds.x_test and data.decode([0, 1, 2], ds.vocabulary) == "ab\ufffd"
    np.testing.assert_array_equal(data.encode("abz", "ab"), [0, 1, 2])


def test_text_from_a_file_and_from_the_standard_library(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(TEXT)
    ds = data.load(f"text:{path}")
    assert ds.name == f"text:{path}" and ds.x_train.shape[1] == 64
    stdlib = data.load("text")
    assert stdlib.x_train.shape[0] > 1000 and len(stdlib.vocabulary) > 60
    assert 3.0 < data.unigram_entropy_bits(stdlib.y_train) < 6.0
    assert data.unigram_entropy_bits("aabb") == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="text: no file .*nothing.txt"):
        data.load(f"text:{tmp_path / 'nothing.txt'}")
    with pytest.raises(ValueError, match="make no window of 64"):
        data.text_dataset("short text")


def test_data_names_for_the_cli():
    data.check_name("text:notes.txt")
    data.check_name("adding")
    with pytest.raises(ValueError, match="data must be one of digits, .*text, or text:PATH"):
        data.check_name("text:")
    assert data.run_name("text:~/books/emma.txt") == "text-emma" and data.run_name("copy") == "copy"


# --- model specs -----------------------------------------------------------------------------------

SPECS = ["rnn:4", "gru:4,4", "lstm:4", "cnn1d:4", "transformer:d_model=8,layers=1,heads=2"]


@pytest.fixture(scope="module")
def tiny_sets():
    return {
        "adding": data.adding_problem(jax.random.PRNGKey(0), num_examples=20, length=6),
        "copy": data.copy_task(jax.random.PRNGKey(0), num_examples=20, copy_length=2, delay=3),
        "text": data.text_dataset(TEXT, window=6),
    }


@pytest.mark.parametrize("spec", SPECS)
def test_sequence_specs_build_and_run(spec, tiny_sets):
    for name, ds in tiny_sets.items():
        model = models.build_for(spec, ds)
        x = jnp.asarray(ds.x_train[:3])
        params = jax.jit(model.init)(jax.random.PRNGKey(0), x)  # jit: one compile beats op-by-op dispatch here
        y = jax.jit(model.apply)(params, x)
        expected = (3, 6, ds.num_classes) if name == "text" else (3, 7, 10) if name == "copy" else (3, 1)
        assert y.shape == expected, name


@pytest.mark.parametrize("spec", SPECS)
def test_per_step_models_never_see_a_later_step(spec, tiny_sets):
    ds = tiny_sets["text"]
    model = models.build_for(spec, ds)
    x = jnp.asarray(ds.x_train[:2])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    changed = x.at[:, 4].set((x[:, 4] + 1) % ds.num_classes)
    apply = jax.jit(model.apply)
    before, after = apply(params, x), apply(params, changed)
    np.testing.assert_allclose(before[:, :4], after[:, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[:, 4], after[:, 4])


def test_spec_syntax_and_errors():
    kind, options = models.parse("transformer:d_model=32,layers=3")
    assert kind == "transformer" and options == {"d_model": 32, "layers": 3, "heads": 4, "mlp_ratio": 4}
    assert models.parse("lstm") == ("lstm", (64,)) and models.parse("gru:8,16") == ("gru", (8, 16))
    cases = [
        ("transformer:width=3", "keys d_model, layers, heads, mlp_ratio"),
        ("transformer:d_model=10,heads=4", "d_model 10 does not divide by heads 4"),
        ("transformer:layers=0", "layers must be a positive integer"),
        ("lstm:x", "expected positive integer widths"),
        ("resnet", "got kind 'resnet'"),
    ]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            models.build(spec, (5, 2), 1)
    with pytest.raises(ValueError, match=r"a lstm needs sequences \(time, features\)"):
        models.build("lstm", (5,), 1)
    with pytest.raises(ValueError, match="use a sequence model"):
        models.build("mlp", (5,), 3, per_step=True)


def test_sample_is_keyed_and_greedy_at_temperature_zero(tiny_sets):
    ds = tiny_sets["text"]
    model = models.build_for("gru:4", ds)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(ds.x_train[:1]))
    prompt, unknown = ds.x_train[0, :3], len(ds.vocabulary)
    first = models.sample(model, params, prompt, length=9, window=6, key=jax.random.PRNGKey(1), exclude=unknown)
    again = models.sample(model, params, prompt, length=9, window=6, key=jax.random.PRNGKey(1), exclude=unknown)
    assert first.shape == (9,) and np.array_equal(first, again) and not np.any(first == unknown)
    greedy = models.sample(model, params, prompt, length=2, window=6, key=jax.random.PRNGKey(2), temperature=0.0)
    logits = model.apply(params, jnp.asarray(np.pad(prompt, (0, 3)))[None])
    assert greedy[0] == int(jnp.argmax(logits[0, 2]))


# --- fbp train and fbp generate, as the user types them ----------------------------------------------


def test_train_on_the_adding_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "adding", "--model", "lstm:4", "--epochs", "1", "--batch-size", "1000"]) == 0
    out = tmp_path / "runs" / "adding-lstm-4-seed0"
    line = json.loads((out / "metrics.jsonl").read_text())
    assert line["test_accuracy"] is None and 0.0 < line["test_loss"] < 10.0  # MSE on the sum, after 4 steps
    assert not (out / "vocabulary.json").exists()
    assert "test loss" in capsys.readouterr().out


def test_train_text_then_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text(TEXT)
    args = ["train", "--data", "text:small.txt", "--model", "transformer:d_model=8,layers=1,heads=2",
            "--epochs", "1", "--batch-size", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bits per character; the training text's unigram entropy is" in printed
    out = "runs/text-small-transformer-d_model=8-layers=1-heads=2-seed0"
    line = json.loads((tmp_path / out / "metrics.jsonl").read_text())
    assert line["test_bpc"] == pytest.approx(line["test_loss"] / math.log(2))
    vocabulary = json.loads((tmp_path / out / "vocabulary.json").read_text())
    assert vocabulary["characters"] == "".join(sorted(set(TEXT))) and vocabulary["window"] == 64

    assert main(["generate", "--out", out, "--length", "30", "--prompt", "def ", "--seed", "3"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def ") and len(sample) == 4 + 30 + 1
    assert set(sample[4:-1]) <= set(TEXT)  # never the unknown character
    assert main(["generate", "--out", out, "--length", "30", "--prompt", "def ", "--seed", "3"]) == 0
    assert capsys.readouterr().out == sample


def test_generate_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--out", "nowhere"]) == 1
    assert "no run folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["generate", "--out", "run"]) == 1
    assert "only a run on text data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--out", "run", "--length", "0"])
    assert exit_info.value.code == 2


def test_train_rejects_an_unknown_data_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "cifar"])
    assert exit_info.value.code == 2
    assert "data must be one of digits" in capsys.readouterr().err


def test_sequence_benchmark_smoke(capsys):
    import runpy
    from pathlib import Path

    sequences = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "sequences.py"))
    assert sequences["main"](["--quick", "--round-seconds", "0.01"]) == 0
    out = capsys.readouterr().out
    for variant in sequences["VARIANTS"]:
        assert out.count(f"| {variant} |") == len(sequences["QUICK"])
    assert out.count("targets: manual / autodiff") == len(sequences["QUICK"])


def test_the_benchmarks_dot_product_attention_reference_is_the_same_model():
    """The benchmark's jax.grad reference (attention by jax.nn.dot_product_attention) computes fbp's transformer."""
    import runpy
    from pathlib import Path

    sequences = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "sequences.py"))
    cfg = {"kind": "transformer", "batch": 2, "time": 8, "d_model": 16, "blocks": 2, "vocab": 11}
    model, _, x, _ = sequences["build"](cfg)
    reference = sequences["build"](cfg, sequences["DotProductBlock"])[0]
    params = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(reference.apply(params, x), model.apply(params, x), rtol=2e-5, atol=2e-5)
    # the cache: x, q, k, v, o (2, 8, 16) and the row log-sum-exp (2, 2 heads, 8), float32: linear in time
    assert sequences["attention_cache"](cfg) == ((5 * 2 * 8 * 16 + 2 * 2 * 8) * 4, 2 * 2 * 8 * 8 * 4)
    assert sequences["attention_cache"]({**cfg, "time": 16}) == ((5 * 2 * 16 * 16 + 2 * 2 * 16) * 4, 2 * 2 * 16 * 16 * 4)
