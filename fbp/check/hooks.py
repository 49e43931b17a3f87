"""The hook witness: each layer's per-example hooks against jax.vmap of its own backward, layer by layer.

Clipping per example at the cost of a batch gradient (``fbp.grads.clipped_value_and_grad``,
the step behind ``make_train_step(per_example=True, clip_norm=C)``) never forms
a per-example gradient: it asks every layer for the squared norm of each
example's gradient and for a weighted sum of them, through the optional hooks
of ``fbp.layers.base.LayerProtocol`` (``call_per_example_backward``). A wrong
hook trains silently with wrong clipping, so every hook the step runs is
checked here, not trusted:

- ``per_example_backward(params, cache, dy)`` (combinators, loop layers, and
  any layer that has it; then it is all the step calls): its norms, its dx
  against ``backward``'s, and its ``weighted_grads(w)``;
- else ``per_example_sq_norms(params, cache, dy)`` against ``||g_i||^2`` and
  ``per_example_weighted_grads(params, cache, dy, w)`` against ``sum_i w_i g_i``;
- and where a layer with parameters lacks one of those, the fallback the step
  then runs (``call_per_example_backward``: jax.vmap of backward over its cache).

The reference is the slow, obvious one: example i's gradient g_i is the
layer's own ``backward`` with dy zero outside example i (backward is linear in
dy and examples do not mix, so this is exactly example i's gradient, with the
cache and any dropout mask of the batch), for every i by jax.vmap. It is
trusted only once that backward is (``check_gradients`` runs this witness when
the other three pass). Every layer is checked at the input it sees in the
model (``locate.walk``), with a random cotangent dy ~ N(0, 1) shaped like its
output and random weights in [0.1, 1) (drawn on the host: a PRNG in the
program would triple its compile time).

Layers come in post-order, children before their combinator, so the first
failing layer is the one whose own hook is wrong: every plain layer and the
model itself in one compile, and the combinators inside the model only when
the model fails while its plain layers pass (then one of them wires its
children's hooks wrongly). The tolerance is the rule of ``fbp.check.tolerance``:
rtol by dtype, the zero floor, and when a row fails, the measured rounding of
both sides (the same hook and reference rerun from the same cache in
``noise_precision``); a logic error is wrong there too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.check.compare import by_path, cast, compare_leaf, compare_trees, float_leaves
from fbp.check.locate import Node, walk
from fbp.check.report import LayerReport, LeafCheck, failed_row, raised_row
from fbp.check.tolerance import Tolerance, larger, precision_of
from fbp.layers.base import call_per_example_backward, describe, scale_examples

HOOKS = ("per_example_backward", "per_example_sq_norms", "per_example_weighted_grads")
FALLBACK = "call_per_example_backward"  # what the step runs for a layer with parameters and no hook
_HOOK_SALT = 0x400C  # hook cotangents and weights differ from the layer checks' cotangents


def hooks_of(layer, params) -> tuple[str, ...]:
    """The hooks a train step runs on ``layer`` (``call_per_example_backward``), to be checked; () without parameters.

    ``per_example_backward`` when the layer has it (then it is all the step calls:
    the other two, if defined, are not run); else ``per_example_sq_norms`` and
    ``per_example_weighted_grads`` where defined, and the fallback (vmap of
    backward, or backward with each example's dy weighted) where not.
    """
    if not float_leaves(params):
        return ()
    if callable(getattr(layer, "per_example_backward", None)):
        return ("per_example_backward",)
    own = tuple(hook for hook in HOOKS[1:] if callable(getattr(layer, hook, None)))
    return own if len(own) == 2 else (*own, FALLBACK)


def reference(layer, params, cache, dy, weights) -> dict[str, Any]:
    """Traced: ``{"sq_norms": (batch,), "weighted": dparams, "dx": dx}`` from jax.vmap of ``layer.backward``.

    Example i's gradient is ``backward`` with dy zero outside example i.
    """
    batch = dy.shape[0]

    def gradient_of(i):
        return layer.backward(params, cache, scale_examples(dy, jnp.arange(batch) == i))[0]

    grads = jax.vmap(gradient_of)(jnp.arange(batch))
    dtype = jnp.promote_types(dy.dtype, jnp.float32)
    leaves = jax.tree_util.tree_leaves(grads)
    sq_norms = sum(jnp.sum(jnp.square(g.reshape(batch, -1).astype(dtype)), axis=1) for g in leaves)
    weighted = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), grads)
    return {"sq_norms": sq_norms, "weighted": weighted, "dx": layer.backward(params, cache, dy)[1]}


def run_hook(layer, hook: str, params, cache, dy, weights) -> dict[str, Any]:
    """Traced: what ``hook`` gives, under the keys of ``reference`` (only those it computes)."""
    if hook == "per_example_sq_norms":
        return {"sq_norms": layer.per_example_sq_norms(params, cache, dy)}
    if hook == "per_example_weighted_grads":
        return {"weighted": layer.per_example_weighted_grads(params, cache, dy, weights)}
    walk_back = layer.per_example_backward if hook == "per_example_backward" else None
    sq_norms, dx, weighted_grads = (
        walk_back(params, cache, dy) if walk_back else call_per_example_backward(layer, params, cache, dy)
    )
    return {"sq_norms": sq_norms, "dx": dx, "weighted": weighted_grads(weights)}


class HookPair(NamedTuple):
    """One layer at one input: the reference and every hook's results (traced, or concrete once out of jit).

    Attributes:
      params, x, key: what the layer was run on. dy: the cotangent. weights: ``(batch,)``.
      reference: ``reference(...)``.
      found: by hook, its results (``run_hook``), or the text of the error it raised (checked alone).
    """

    params: Any
    x: Any
    key: Any
    dy: Any
    weights: Any
    reference: dict
    found: dict


def hook_pair(layer, hooks: tuple[str, ...], params, x, key, dy, weights) -> HookPair:
    """Traced: the reference and every hook of ``hooks`` for one layer at input x (batch first)."""
    _, cache = layer.forward(params, x, key=key)
    found = {hook: run_hook(layer, hook, params, cache, dy, weights) for hook in hooks}
    return HookPair(params, x, key, dy, weights, reference(layer, params, cache, dy, weights), found)


def _parts(path: str, results: dict) -> dict[str, Any]:
    """{row path: leaf} of one side: ``"[1] sq_norms"``, ``"[1] dx"``, ``"[1] weighted['W']"``."""
    out = {}
    if "sq_norms" in results:
        out[f"{path} sq_norms"] = results["sq_norms"]
    if results.get("dx") is not None:
        out[f"{path} dx"] = results["dx"]
    if "weighted" in results:
        out.update({f"{path} weighted{p}": leaf for p, leaf in by_path(results["weighted"]).items()})
    return out


def _rows(name: str, hook: str, pair: HookPair, tol: Tolerance, allowance: dict) -> list[LeafCheck]:
    """The rows of one hook of one layer; ``allowance`` by row path (measured noise, scaled), floors added here."""
    results = pair.found[hook]
    if isinstance(results, str):  # it raised
        return [failed_row(hook, f"{name} {hook}", (), results)]
    ref = pair.reference
    floors = {part: tol.zero_floor(ref[part]) for part in ("sq_norms", "weighted", "dx") if ref[part] is not None}

    def noise(path, part):
        return allowance.get(path, 0.0) + floors.get(part, 0.0)

    rows = []
    if "sq_norms" in results:
        path = f"{name} sq_norms"
        rows.append(
            compare_leaf(hook, path, ref["sq_norms"], results["sq_norms"], tol.rtol, tol.atol, noise(path, "sq_norms"))
        )
    if "dx" in results:
        path = f"{name} dx"
        if ref["dx"] is None:
            if results["dx"] is not None:
                rows.append(failed_row(hook, path, jnp.shape(results["dx"]), "dx must be None for integer x"))
        else:
            rows.append(compare_leaf(hook, path, ref["dx"], results["dx"], tol.rtol, tol.atol, noise(path, "dx")))
    if "weighted" in results:
        prefix = f"{name} weighted"
        leaf_noise = {p: noise(prefix + p, "weighted") for p in by_path(ref["weighted"])}
        rows += compare_trees(hook, ref["weighted"], results["weighted"], tol.rtol, tol.atol, prefix, leaf_noise)
    return rows


def _noises(items: list[tuple[Node, HookPair, Tolerance]]) -> list[dict[str, Any]]:
    """For each (layer, pair, tolerance): by row path, the measured rounding of its reference and of every hook
    that ran (see the module docstring); all in one x64 jit."""

    def hooks_ran(pair):
        return tuple(hook for hook, results in pair.found.items() if not isinstance(results, str))

    def in_other_precision(inputs):
        out = []
        for (node, pair, tol), (params, x, dy, weights) in zip(items, inputs):
            layer = node.layer
            cache = layer.forward(params, x, key=pair.key)[1]  # the forward as checked; hooks in the other precision
            params, cache, dy, weights = cast((params, cache, dy, weights), tol.noise_precision)
            found = {hook: run_hook(layer, hook, params, cache, dy, weights) for hook in hooks_ran(pair)}
            out.append((reference(layer, params, cache, dy, weights), found))
        return out

    with jax.enable_x64(True):
        others = jax.jit(in_other_precision)([(pair.params, pair.x, pair.dy, pair.weights) for _, pair, _ in items])
        noises = []
        for (node, pair, tol), (other_reference, other_found) in zip(items, others):
            name = node.path or "model"
            noise = tol.noise(_parts(name, pair.reference), _parts(name, other_reference))
            for hook in hooks_ran(pair):
                noise = larger(noise, tol.noise(_parts(name, pair.found[hook]), _parts(name, other_found[hook])))
            noises.append(noise)
    return noises


def _descends(path: str, ancestor: str) -> bool:
    """Whether the layer at ``path`` lies inside the combinator at ``ancestor`` (``""``: the model)."""
    return path != ancestor and path.startswith(ancestor) and (not ancestor or path[len(ancestor)] in "[.")


def judge(found: dict[int, Node], pairs: dict[int, HookPair], settings: Tolerance) -> dict[int, dict]:
    """By layer index, by hook, the rows of every pair; the rounding-noise estimate only where it can matter.

    A row that fails without the estimate gets a second look with it (it can only
    widen), all such layers in one compile; but a combinator that fails while a
    layer inside it fails for sure is wrong through that layer, and is left
    failing without paying for its estimate (its whole walk, in float64).
    """
    tols = {i: settings.for_dtype(precision_of(pair.params, pair.x)) for i, pair in pairs.items()}

    def rows_of(i, allowance):
        name = found[i].path or "model"
        return {hook: _rows(name, hook, pairs[i], tols[i], allowance) for hook in pairs[i].found}

    rows = {i: rows_of(i, {}) for i in pairs}
    failing = sorted(i for i in pairs if not _all_ok(rows[i]) and tols[i].measures_noise)
    inner = {i: {j for j in failing if _descends(found[j].path, found[i].path)} for i in failing}
    confirmed: set[int] = set()

    def second_look(batch):
        for i, noise in zip(batch, _noises([(found[i], pairs[i], tols[i]) for i in batch]) if batch else ()):
            rows[i] = rows_of(i, tols[i].allowance(noise))
            if not _all_ok(rows[i]):
                confirmed.add(i)

    second_look([i for i in failing if not inner[i]])
    for i in (i for i in failing if inner[i]):  # post-order: every layer inside i was judged before i
        if inner[i] & confirmed:
            confirmed.add(i)
        else:
            second_look([i])
    return rows


def _all_ok(by_hook: dict[str, list[LeafCheck]]) -> bool:
    return all(r.ok for hook_rows in by_hook.values() for r in hook_rows)


@dataclasses.dataclass(frozen=True)
class HookCheck:
    """The hook witness's verdict on a model.

    Attributes:
      rows: every hook row checked, layers in post-order (check: the hook's name).
      first_bad_layer: ``"[1] Dense(5)"``-style name of the first layer with a failing hook, or None.
      first_bad_hook: that hook's name, e.g. ``"per_example_sq_norms"``, or None.
      layer_report: that layer's rows of that hook as a LayerReport, or None.
      layers: how many layers had hooks checked.
    """

    rows: list[LeafCheck]
    first_bad_layer: str | None = None
    first_bad_hook: str | None = None
    layer_report: LayerReport | None = None
    layers: int = 0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


class _Layer(NamedTuple):
    """A layer of the model as the search sees it: where, which hooks, and its output (shapes only)."""

    node: Node
    hooks: tuple[str, ...]  # for a combinator, the hooks of the second pass
    y: jax.ShapeDtypeStruct


def check_hooks(model, params, x, *, key=None, seed: int = 0, settings: Tolerance | None = None) -> HookCheck:
    """Check the per-example hooks of every layer of ``model`` at the batch ``x`` (batch axis first).

    Args:
      model: any layer; the search descends into layers with ``children``.
      params: its parameters. x: a batch, batch axis first (every layer's input keeps it).
      key: the model's PRNG key (dropout), as the forward pass gets it; None for inference mode.
      seed: seeds the cotangents and the weights.
      settings: the tolerance settings (``Tolerance``); default rule when None.

    Returns:
      A HookCheck; a hook that raises is one failing row.
    """
    settings = settings or Tolerance()
    found = _layers(model, params, x, key)
    root = len(found) - 1
    first_pass = {i: f.hooks for i, f in enumerate(found) if f.hooks and (i == root or not f.node.combinator)}
    inputs = _host_inputs(found, seed, jnp.shape(x)[0])
    nodes = {i: f.node for i, f in enumerate(found)}
    rows = judge(nodes, _run(model, params, x, key, first_pass, inputs), settings)
    failing = [i for i in sorted(rows) if not _all_ok(rows[i])]
    if failing == [root] and root in rows:  # only the model: which of its combinators wires its children wrong?
        second = {i: f.hooks for i, f in enumerate(found) if f.hooks and f.node.combinator and i != root}
        rows.update(judge(nodes, _run(model, params, x, key, second, inputs), settings))
    checked = [r for i in sorted(rows) for hook_rows in rows[i].values() for r in hook_rows]
    for i in sorted(rows):
        for hook, hook_rows in rows[i].items():
            if not all(r.ok for r in hook_rows):
                node = found[i].node
                report = LayerReport(f"{describe(node.layer)}.{hook}", hook_rows)
                name = f"{node.path or 'model'} {describe(node.layer)}"
                return HookCheck(checked, name, hook, report, len(rows))
    return HookCheck(checked, layers=len(rows))


def _layers(model, params, x, key) -> list[_Layer]:
    """Every layer in post-order (as ``locate.nodes``), with its hooks and output (traced on shapes only)."""
    found = []

    def visit(node, p, layer_x, k):
        y = node.layer.apply(p, layer_x, key=k)
        found.append(_Layer(node, hooks_of(node.layer, p), jax.ShapeDtypeStruct(y.shape, y.dtype)))

    jax.eval_shape(lambda p, x, k: walk(model, p, x, k, visit), params, x, key)
    return found


def _host_inputs(found: list[_Layer], seed: int, batch: int) -> tuple[dict[int, jax.Array], jax.Array]:
    """({layer index: dy ~ N(0, 1) shaped like its output}, weights ~ U[0.1, 1) ``(batch,)``), drawn with numpy."""
    rng = np.random.default_rng((seed, _HOOK_SALT))
    dys = {i: jnp.asarray(rng.standard_normal(f.y.shape), f.y.dtype) for i, f in enumerate(found) if f.hooks}
    dtypes = [jnp.promote_types(f.y.dtype, jnp.float32) for f in found if f.hooks] or [jnp.float32]
    weights = jnp.asarray(rng.uniform(0.1, 1.0, batch), max(dtypes, key=lambda d: jnp.finfo(d).bits))
    return dys, weights


def _pairs(model, params, x, key, wanted: dict[int, tuple[str, ...]], dys, weights) -> dict[int, HookPair]:
    """Traced: {layer index: HookPair} for the wanted layers and hooks."""
    results, count = {}, [0]

    def visit(node, p, layer_x, k):
        i = count[0]
        count[0] += 1
        if i in wanted:
            results[i] = hook_pair(node.layer, wanted[i], p, layer_x, k, dys[i], weights)

    walk(model, params, x, key, visit)
    return results


def _run(model, params, x, key, wanted: dict[int, tuple[str, ...]], inputs) -> dict[int, HookPair]:
    """The wanted layers' pairs in one jit; if that raises, layer by layer and hook by hook (a raise is a row)."""
    if not wanted:
        return {}
    dys, weights = inputs
    pairs = lambda wanted: jax.jit(lambda p, x, dys, w: _pairs(model, p, x, key, wanted, dys, w))
    try:
        return pairs(wanted)(params, x, {i: dys[i] for i in wanted}, weights)
    except Exception:  # noqa: BLE001 - some hook cannot even be traced: one at a time below
        out = {}
    for i, hooks in wanted.items():
        try:
            base = pairs({i: ()})(params, x, {i: dys[i]}, weights)[i]
        except Exception:  # noqa: BLE001, S112 - the backward itself raises: the other witnesses report that
            continue
        found = {}
        for hook in hooks:
            try:
                found[hook] = pairs({i: (hook,)})(params, x, {i: dys[i]}, weights)[i].found[hook]
            except Exception as error:  # noqa: BLE001 - a hook that raises is a failing row
                found[hook] = raised_row(hook, "", (), error).worst_index
        out[i] = base._replace(found=found)
    return out
