"""The first-wrong-layer search: which layer (or the loss) is wrong on its own?

Every layer is checked as ``check_layer`` does, on the input it really sees in
the model. The search descends into any layer that says what it is made of
(``children(params, x, *, key=None) -> list[Child]``, see
``fbp.layers.base.LayerProtocol``): Sequential and Residual, and a combinator a
user writes, alike. Children come before their combinator, in forward order, so
a combinator is blamed only when all its children pass and it still fails as a
whole (its own wiring is wrong).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fbp.check.layer import (
    LayerPair,
    check_layer,
    check_loss,
    cotangent_key,
    layer_pair,
    layer_report,
    loss_backward,
    loss_gradient,
    loss_report,
)
from fbp.check.report import LayerReport
from fbp.check.tolerance import NOISE_FACTOR, Tolerance
from fbp.layers.base import describe


def children(layer, params, x, key) -> list:
    """``layer.children(params, x, key=key)``: its direct sub-layers as Child entries; [] for a plain layer."""
    method = getattr(layer, "children", None)
    return list(method(params, x, key=key)) if callable(method) else []


class Node(NamedTuple):
    """A layer in the model's tree: ``path`` from the model (``""`` for the model itself), and whether it has children."""

    path: str
    layer: Any
    combinator: bool


def walk(layer, params, x, key, visit: Callable, path: str = "") -> None:
    """Post-order: ``visit(Node, params, x, key)`` for every layer, children (in forward order) before their parent."""
    below = children(layer, params, x, key)
    for child in below:
        walk(child.layer, child.params, child.x, child.key, visit, path + child.path)
    visit(Node(path, layer, bool(below)), params, x, key)


def nodes(model, params, x, key) -> list[Node]:
    """Every layer of the model, in post-order (traced on shapes only: a combinator's children need its inputs)."""
    found = []
    jax.eval_shape(lambda p, x, k: walk(model, p, x, k, lambda node, *_: found.append(node)), params, x, key)
    return found


def _name(node: Node) -> str:
    return f"{node.path or 'model'} {describe(node.layer)}"


@dataclasses.dataclass(frozen=True)
class _Search:
    """One search: the model at one input, the loss at its prediction (if any), and the tolerance settings."""

    model: Any
    params: Any
    x: Any
    key: Any
    loss: Any
    y: Any
    seed: int
    settings: Tolerance

    def pairs(self, params, x, wanted: set[int]) -> dict[int, LayerPair]:
        """Traced: {node index: LayerPair} for the wanted nodes (the index salts each cotangent)."""
        results, count = {}, [0]

        def visit(node, p, layer_x, k):
            i = count[0]
            count[0] += 1
            if i in wanted:
                results[i] = layer_pair(node.layer, p, layer_x, k, cotangent_key(self.seed, i))

        walk(self.model, params, x, self.key, visit)
        return results

    def plain_layers_and_loss(self, params, x, y, plain: set[int]):
        """Traced: the pairs of the plain layers, and (pred, jax.grad, manual dL/dpred) of the loss, if any."""
        pairs = self.pairs(params, x, plain)
        if self.loss is None:
            return pairs, None
        pred = self.model.apply(params, x, key=self.key)
        return pairs, (pred, loss_gradient(self.loss, pred, y), loss_backward(self.loss, pred, y))

    def run(self) -> tuple[str | None, LayerReport | None]:
        """The plain layers (and the loss) as one jit, the combinators before the first failing layer as a
        second; if some backward cannot even be traced, layer by layer."""
        try:
            found = nodes(self.model, self.params, self.x, self.key)
            plain = {i for i, node in enumerate(found) if not node.combinator}
            pairs, at_loss = jax.jit(lambda p, x, y: self.plain_layers_and_loss(p, x, y, plain))(
                self.params, self.x, self.y
            )
            report = _Reports(found, pairs, self.settings)
            first_plain = next((i for i in sorted(plain) if not report(i).ok), len(found))
            combinators = {i for i, node in enumerate(found) if node.combinator and i < first_plain}
            if combinators:
                pairs.update(jax.jit(lambda p, x: self.pairs(p, x, combinators))(self.params, self.x))
        except Exception:  # noqa: BLE001 - some backward cannot be traced: go layer by layer
            return self.layer_by_layer()
        for i in sorted(pairs):
            if not report(i).ok:
                return _name(found[i]), report(i)
        if at_loss is not None:
            pred, reference, dpred = at_loss
            loss_check = loss_report(self.loss, pred, self.y, reference, dpred, self.settings)
            if not loss_check.ok:
                return f"loss {describe(self.loss)}", loss_check
        return None, None

    def layer_by_layer(self) -> tuple[str | None, LayerReport | None]:
        """One check_layer per layer, depth first: slow, but a backward that raises is just a failing layer."""
        tolerances = self.settings.as_arguments()

        def first_bad(layer, params, x, key, path):
            for child in children(layer, params, x, key):
                found = first_bad(child.layer, child.params, child.x, child.key, path + child.path)
                if found[0] is not None:
                    return found
            report = check_layer(layer, params, x, key=key, **tolerances)
            return (None, None) if report.ok else (_name(Node(path, layer, False)), report)

        name, report = first_bad(self.model, self.params, self.x, self.key, "")
        if name is None and self.loss is not None:
            report = check_loss(self.loss, self.model.apply(self.params, self.x, key=self.key), self.y, **tolerances)
            return (f"loss {describe(self.loss)}", report) if not report.ok else (None, None)
        return name, report


@dataclasses.dataclass
class _Reports:
    """The LayerReport of node i from its concrete pair, computed once (the rounding-noise estimate compiles)."""

    found: list[Node]
    pairs: dict[int, LayerPair]
    settings: Tolerance
    done: dict[int, LayerReport] = dataclasses.field(default_factory=dict)

    def __call__(self, i: int) -> LayerReport:
        if i not in self.done:
            self.done[i] = layer_report(self.found[i].layer, self.pairs[i], self.settings)
        return self.done[i]


def find_first_bad_layer(
    model,
    params,
    x,
    *,
    key=None,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_factor: float = NOISE_FACTOR,
    loss=None,
    y=None,
    seed: int = 0,
):
    """Depth-first, in forward order: the first layer whose backward disagrees with jax.vjp.

    Every layer is checked as ``check_layer`` does, on the input it sees in the
    model; the search descends into every layer with ``children`` (a
    combinator), children before their combinator, so a combinator is blamed
    only when all its children pass but it fails as a whole (its own wiring is
    wrong). With ``loss`` and ``y``, the loss's backward is checked last, at
    the model's prediction.

    Returns:
      (name, LayerReport), e.g. ``("[2] Dense(3)", report)``, ``("[1].block[0] Dense(6)", report)``
      or ``("loss MSE()", report)``; (None, None) when every part agrees.
    """
    return _Search(model, params, x, key, loss, y, seed, Tolerance(rtol, atol, noise_factor)).run()
