"""docs/concepts.md runs: every ```python block, in order within its section, asserts its own claims.

Also checks that the guide answers every question it promises, that its links
and images exist, and that the two scripts behind its plots run.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "concepts.md"

QUESTIONS = (  # the list, in its order, plus the two conventions
    "What is backpropagation?",
    "What is a loss function?",
    "MSE and its formula",
    "What is a gradient?",
    "Gradient descent and its update rule",
    "The chain rule",
    "The forward pass and the backward pass",
    "The purpose of backprop",
    "dW and db",
    "Batch-first and the textbook's columns",
    "The weight update rule",
    "Why backprop is needed",
    "The error signal delta (dZ)",
    "The computational graph",
    "What the forward pass caches",
    "The direction of flow",
    "Loss vs gradient: large, small and zero gradients",
    "The learning rate",
    "Batch processing",
    "Forward and backward propagation side by side",
    "What backprop computes",
)


def sections(text: str) -> dict[str, list[str]]:
    """{section title: [its ```python blocks, in order]} for every ``## `` section."""
    result: dict[str, list[str]] = {}
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, body = chunk.partition("\n")
        result[title.strip()] = re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)
    return result


SECTIONS = sections(GUIDE.read_text())


def test_every_question_has_a_numbered_section_with_code():
    titles = list(SECTIONS)
    assert titles == [f"{i}. {question}" for i, question in enumerate(QUESTIONS, start=1)]
    assert all(SECTIONS[title] for title in titles), [title for title in titles if not SECTIONS[title]]


@pytest.mark.parametrize("title", list(SECTIONS))
def test_section_code_runs(title):
    namespace = {"__name__": "concepts_snippet"}
    # The snippets run as a reader runs them, with JAX's default broadcasting: they write the
    # textbook's `x @ W + b`, which conftest's rank_promotion="raise" would reject.
    with jax.numpy_rank_promotion("allow"):
        for number, code in enumerate(SECTIONS[title], start=1):
            code = compile(code, f"{GUIDE.name} [{title}] block {number}", "exec", dont_inherit=True)
            exec(code, namespace)  # noqa: S102 -- running the guide's own code is the point


def test_links_and_images_exist():
    text = GUIDE.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the guide should link its scripts and plots"
    missing = [t for t in local if not (GUIDE.parent / t).exists()]
    assert not missing, f"broken links in {GUIDE.name}: {missing}"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        path = GUIDE.parent / image
        assert path.suffix == ".png" and path.stat().st_size < 300_000, f"{image}: keep plots small PNGs"


def test_anchors_point_at_sections():
    text = GUIDE.read_text()

    def anchor(title):  # GitHub's rule: lower case, drop punctuation but - and _, spaces become -
        return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")

    anchors = {anchor(title) for title in SECTIONS}
    used = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert used <= anchors, sorted(used - anchors)


def _script(name: str) -> dict:
    return runpy.run_path(str(ROOT / "scripts" / name), run_name="fbp_script")


def test_lr_sweep_script_plots_slow_good_and_diverging_runs(tmp_path, capsys):
    script = _script("lr_sweep.py")
    assert script["main"](["--steps", "60", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0
    runs = dict(re.findall(r"^(too low|good|too high) .*?-> (.*)$", capsys.readouterr().out, flags=re.MULTILINE))
    assert runs["too high"].startswith("diverged")
    final_low, final_good = (float(runs[name].removeprefix("final ")) for name in ("too low", "good"))
    assert final_good < final_low  # after 60 steps the good rate is well ahead of the slow one


def test_why_backprop_script_measures_and_plots(tmp_path, capsys):
    script = _script("why_backprop.py")
    assert script["main"](["--widths", "2,3", "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "why_backprop.png").stat().st_size > 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "params" not in line]
    assert len(rows) == 2
    # 8 -> w -> w -> 1: 8w + w + w*w + w + w + 1 parameters; FD needs twice as many forward passes
    for line, width in zip(rows, (2, 3)):
        params = 8 * width + width + width * width + width + width + 1
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:2] == [f"{params:,}", f"{2 * params:,}"]
