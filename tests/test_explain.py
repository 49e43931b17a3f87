"""fbp.explain and ``fbp explain``: what is printed is what fbp computes, and the graph is valid DOT."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import explain
from fbp.cli import main
from fbp.explain import graph as graph_module

ROOT = Path(__file__).resolve().parent.parent
PRINT_TOLERANCE = 0.6e-4  # the table prints 4 decimals: rounding moves a value by at most 0.5e-4


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["explain", *args])
    return code, capsys.readouterr().out


def printed_matrix(text: str, title: str) -> np.ndarray:
    """The rows of numbers printed under the value block whose title line starts with ``title``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title) and " shape (" in line)
    rows = []
    for line in lines[start + 1:]:
        try:
            row = [float(v) for v in line.split()]
        except ValueError:
            break
        if not row:
            break
        rows.append(row)
    assert rows, f"no numbers under {title!r}"
    return np.array(rows)


@pytest.mark.parametrize(("activation", "batch"), [(name, 3) for name in sorted(explain.ACTIVATIONS)] + [("tanh", 1)])
def test_explanation_grads_equal_value_and_grad(activation, batch):
    model, loss, params, x, y = explain.example(seed=1, batch=batch, activation=activation)
    result = explain.explain(model, loss, params, x, y, lr=0.05)
    value, grads = fbp.value_and_grad(model, loss)(params, x, y)
    chex.assert_trees_all_close(result.grads, grads)
    chex.assert_trees_all_close(result.loss_value, value)
    chex.assert_trees_all_close(result.prediction, model.apply(params, x))
    chex.assert_trees_all_close(result.new_params, jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
    assert result.autodiff_max_abs_diff < 1e-5
    assert [step.index for step in result.backward] == [2, 1, 0]  # reverse layer order


def test_names_follow_the_textbook():
    model, loss, params, x, y = explain.example(sizes=(3, 5, 4, 2), activation="relu")
    result = explain.explain(model, loss, params, x, y)
    assert [(s.input_name, s.output_name) for s in result.forward] == [
        ("A[0]", "Z[1]"), ("Z[1]", "A[1]"), ("A[1]", "Z[2]"), ("Z[2]", "A[2]"), ("A[2]", "Z[3]")]
    dense = [step for step in result.backward if step.dparams]
    assert [step.names for step in dense] == [
        ("dW[3]", "db[3]", "dA[2]"), ("dW[2]", "db[2]", "dA[1]"), ("dW[1]", "db[1]", "dA[0]")]


@pytest.mark.parametrize("args", [(), ("--seed", "3", "--batch", "3", "--activation", "relu", "--lr", "0.5")])
def test_printed_gradients_and_update_equal_value_and_grad(capsys, args):
    code, out = run_cli(capsys, *args)
    assert code == 0
    options = dict(zip(args[::2], args[1::2]))
    seed, batch, lr = int(options.get("--seed", 0)), int(options.get("--batch", 2)), float(options.get("--lr", 0.1))
    model, loss, params, x, y = explain.example(seed=seed, batch=batch,
                                                activation=options.get("--activation", "tanh"))
    value, grads = fbp.value_and_grad(model, loss)(params, x, y)
    assert f"= {float(value):.6f}" in out
    for layer, index in ((1, 0), (2, 2)):
        for name in ("W", "b"):
            printed = printed_matrix(out, f"d{name}[{layer}] =")
            np.testing.assert_allclose(printed, np.atleast_2d(grads[index][name]), atol=PRINT_TOLERANCE)
            updated = printed_matrix(out, f"{name}[{layer}] - {lr:g} * d{name}[{layer}]")
            np.testing.assert_allclose(updated, np.atleast_2d(params[index][name] - lr * grads[index][name]),
                                       atol=PRINT_TOLERANCE)
    hidden = jnp.dot(x, params[0]["W"]) + params[0]["b"][None, :]
    np.testing.assert_allclose(printed_matrix(out, "Z[1] ="), hidden, atol=PRINT_TOLERANCE)


def test_doc_excerpt_is_what_the_command_prints(capsys):
    """The excerpt of ``fbp explain`` in docs/concepts.md is real output, in order."""
    text = (ROOT / "docs" / "concepts.md").read_text()
    block = re.search(r"^```text\n\$ fbp explain\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL).group(1)
    _, out = run_cli(capsys)
    position = 0
    for line in block.splitlines():
        if line == "...":
            continue
        found = out.find(line + "\n", position)
        assert found >= 0, f"not in the output (in this order): {line!r}"
        position = found + len(line)


# ------------------------------------------------------------------------------------------- graph

EXPECTED_NODES = {"X", "Y", "op1", "W1", "b1", "op2", "op3", "W2", "b2", "loss", "L"}
EXPECTED_FORWARD = {("X", "op1"), ("W1", "op1"), ("b1", "op1"), ("op1", "op2"), ("op2", "op3"), ("W2", "op3"),
                    ("b2", "op3"), ("op3", "loss"), ("Y", "loss"), ("loss", "L")}


def _graph():
    model, loss, params, x, y = explain.example()
    return explain.computational_graph(explain.explain(model, loss, params, x, y))


def test_graph_has_the_expected_nodes_and_edges():
    graph = _graph()
    assert {node.id for node in graph.nodes} == EXPECTED_NODES
    forward = {(e.source, e.target) for e in graph.edges if e.direction == "forward"}
    backward = {(e.source, e.target): e.label for e in graph.edges if e.direction == "backward"}
    assert forward == EXPECTED_FORWARD
    assert set(backward) == {(b, a) for a, b in EXPECTED_FORWARD - {("Y", "loss")}}
    assert backward[("op3", "W2")] == "dW[2]" and backward[("op2", "op1")] == "dZ[1]"
    assert backward[("loss", "op3")] == "dZ[2]" and backward[("op3", "op2")] == "dA[1]"


def parse_dot(text: str) -> tuple[dict, list]:
    """A strict parser for the DOT subset fbp writes: ``digraph ID { stmt; ... }``.

    Statements: ``ID=value;``, ``node|edge|graph [attrs];``, ``ID [attrs];`` and
    ``ID -> ID [attrs];``. Returns ({node id: attrs}, [(source, target, attrs)]).
    Raises ValueError on anything else.
    """
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|->|[{}\[\];,=]|[A-Za-z_][A-Za-z0-9_.]*|-?[0-9.]+|\S', text)
    position = 0

    def take(expected=None):
        nonlocal position
        if position >= len(tokens):
            raise ValueError("unexpected end of DOT text")
        token = tokens[position]
        if expected is not None and token != expected:
            raise ValueError(f"expected {expected!r}, got {token!r}")
        position += 1
        return token

    def identifier():
        token = take()
        if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*|"(?:[^"\\]|\\.)*"|-?[0-9.]+', token):
            raise ValueError(f"expected an identifier, got {token!r}")
        return token.strip('"')

    def attributes():
        attrs = {}
        if tokens[position] != "[":
            return attrs
        take("[")
        while tokens[position] != "]":
            key = identifier()
            take("=")
            attrs[key] = identifier()
            if tokens[position] in (",", ";"):
                take()
        take("]")
        return attrs

    nodes, edges = {}, []
    take("digraph")
    if tokens[position] != "{":
        identifier()
    take("{")
    while tokens[position] != "}":
        first = identifier()
        if tokens[position] == "=":
            take("=")
            identifier()
        elif first in ("node", "edge", "graph"):
            attributes()
        elif tokens[position] == "->":
            take("->")
            second = identifier()
            edges.append((first, second, attributes()))
        else:
            nodes[first] = attributes()
        take(";")
    take("}")
    if position != len(tokens):
        raise ValueError(f"text after the graph: {tokens[position:]}")
    return nodes, edges


def test_dot_text_parses_to_the_graph():
    graph = _graph()
    nodes, edges = parse_dot(explain.to_dot(graph))
    assert set(nodes) == EXPECTED_NODES
    assert nodes["op1"]["label"] == "Dense(4)\\nZ[1] = A[0] @ W[1] + b[1]"
    assert sorted((s, t) for s, t, _ in edges) == sorted((e.source, e.target) for e in graph.edges)
    dashed = {(s, t) for s, t, attrs in edges if attrs.get("style") == "dashed"}
    assert dashed == {(e.source, e.target) for e in graph.edges if e.direction == "backward"}


def test_parser_rejects_broken_dot():
    with pytest.raises(ValueError):
        parse_dot("digraph g { a -> ; }")
    with pytest.raises(ValueError):
        parse_dot('digraph g { a [label="x"] }')


def test_cli_graph_dot_writes_a_parseable_file(capsys, tmp_path):
    path = tmp_path / "x.dot"
    code, out = run_cli(capsys, "--graph", str(path))
    assert code == 0 and f"written to {path}" in out
    nodes, edges = parse_dot(path.read_text())
    assert set(nodes) == EXPECTED_NODES and len(edges) == 2 * len(EXPECTED_FORWARD) - 1
    if shutil.which("dot"):  # graphviz's own parser, where installed
        subprocess.run(["dot", "-Tsvg", str(path), "-o", str(tmp_path / "x.svg")], check=True)


def test_cli_graph_svg_without_graphviz_falls_back_to_dot(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_module.shutil, "which", lambda name: None)
    code, out = run_cli(capsys, "--graph", str(tmp_path / "g.svg"))
    assert code == 0
    assert not (tmp_path / "g.svg").exists()
    assert "not found" in out and str(tmp_path / "g.dot") in out
    parse_dot((tmp_path / "g.dot").read_text())


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_cli_graph_svg_with_graphviz(capsys, tmp_path):
    code, _ = run_cli(capsys, "--graph", str(tmp_path / "g.svg"))
    assert code == 0 and (tmp_path / "g.svg").read_text().lstrip().startswith("<")


def test_cli_rejects_an_unknown_graph_format_as_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--graph", str(tmp_path / "g.txt")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "usage:" in captured.err and "--graph" in captured.err and captured.out == ""


def test_cli_unwritable_graph_path_fails_in_one_line(capsys, tmp_path):
    assert main(["explain", "--graph", str(tmp_path / "missing" / "g.dot")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fbp explain: cannot write the graph") and len(err.strip().splitlines()) == 1


def test_cli_failing_graphviz_fails_in_one_line(capsys, tmp_path, monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a failing graphviz")
    monkeypatch.setattr(graph_module.shutil, "which", lambda name: false)
    assert main(["explain", "--graph", str(tmp_path / "g.svg")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fbp explain: graphviz's dot failed") and len(err.strip().splitlines()) == 1
    assert "--graph " + str(tmp_path / "g.dot") in err


# ---------------------------------------------------------------------------------- other checks


def test_explain_rejects_models_it_cannot_name():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="Sequential"):
        explain.explain(fbp.Dense(2), fbp.MSE(), fbp.Dense(2).init(jax.random.PRNGKey(0), x), x, jnp.ones((2, 2)))
    model = fbp.Sequential([fbp.Dense(2), fbp.Softmax()])
    with pytest.raises(TypeError, match="Softmax"):
        explain.explain(model, fbp.MSE(), model.init(jax.random.PRNGKey(0), x), x, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="activation"):
        explain.tiny_mlp(activation="swish")


def test_finite_difference_gradient_costs_two_forward_passes_per_parameter(x64):
    model = fbp.Sequential([fbp.Dense(3), fbp.Tanh(), fbp.Dense(2)])
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(1), (4, 2), jnp.float64)
    params = model.init(jax.random.PRNGKey(2), x)
    loss = fbp.MSE()
    fd_grads, forward_passes = explain.finite_difference_gradient(lambda p: loss(model.apply(p, x), y), params)
    _, grads = fbp.value_and_grad(model, loss)(params, x, y)
    assert forward_passes == 2 * sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)) == 2 * 26
    chex.assert_trees_all_close(fd_grads, grads, atol=1e-8)
