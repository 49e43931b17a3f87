"""The README as a new user meets it: its first command, typed as written, and every python block, verbatim.

fbp 0.1 shipped with a green suite while the README's first command crashed
(orbax refused the default relative ``--out``): every test passed an absolute
tmp path. These tests run the installed console script from a fresh working
directory with the default options, shortened by ``--epochs`` only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def _console_script() -> str:
    beside = Path(sys.executable).parent / "fbp"  # the venv's bin/, where pip put it
    found = str(beside) if beside.exists() else shutil.which("fbp")
    if found is None:
        pytest.fail("the `fbp` console script is not installed: run `python -m pip install -e .` first")
    return found


def _user_command(line: str) -> list[str]:
    """The README line's command after its install step: ``pip install ... && fbp train`` -> [fbp, train]."""
    command = shlex.split(line.split("&&")[-1])
    assert command[0] == "fbp", f"expected the README's first command to run fbp, got {line!r}"
    return [_console_script(), *command[1:]]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)


def test_the_first_command_trains_and_resumes_from_a_fresh_directory(tmp_path):
    first_line = _blocks("bash")[0].splitlines()[0]
    train = _user_command(first_line)
    assert train[1:] == ["train"], f"the README's first command should be plain `fbp train`, got {first_line!r}"

    done = _run([*train, "--epochs", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "done: test accuracy" in done.stdout
    assert "Traceback" not in done.stderr
    run = Path("runs") / "digits-mlp-256-256-seed0"  # the default --out, relative to where the user stands
    assert (tmp_path / run / "checkpoints" / "epoch_000002" / "meta.json").is_file()
    assert len((tmp_path / run / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = _run([*train, "--epochs", "3", "--resume", "--out", str(run)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch   3/3" in resumed.stdout
    assert "corrupt" not in resumed.stdout + resumed.stderr

    again = _run([*train, "--epochs", "3", "--resume"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already at epoch 3 of 3: nothing to do" in again.stdout
    assert "epoch   " not in again.stdout and "step/s" not in again.stderr  # no epoch trained, no empty bar


def test_the_test_command_is_what_ci_runs():
    commands = _blocks("bash")[0].splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, f".ci/run must run the README's second command, {commands[1]!r}"


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run_verbatim(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = _blocks("python")[index]
    exec(compile(source, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - running the README is the test


def test_version_and_module_entry_points():
    from fbp import __version__

    version = _run([_console_script(), "--version"], cwd=ROOT)
    assert version.returncode == 0 and version.stdout.strip() == f"fbp {__version__}"
    module = _run([sys.executable, "-m", "fbp", "--help"], cwd=ROOT)
    assert module.returncode == 0 and "train" in module.stdout


def test_extras_agree_between_readme_and_docs():
    # the README's first command installs what training needs; the training guide says the same
    train_extra = re.search(r'pip install -e "\.\[(\w+)\]" && fbp train', README).group(1)
    guide = (ROOT / "docs" / "training.md").read_text()
    assert re.findall(r'pip install -e "\.\[(\w+)\]"', guide) == [train_extra]
