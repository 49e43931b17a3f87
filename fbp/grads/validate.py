"""What the gradient functions accept, checked at trace time: the mode, the model, the loss, params, batch, mask."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers.base import REQUIRED_METHODS, describe, missing_methods

GRAD_MODES = ("manual", "autodiff", "custom_vjp")


MODES = GRAD_MODES  # the name before fbp 0.2.0


PER_EXAMPLE = (False, True, "vmap")


def check_grad_mode(grad, where: str) -> None:
    """Raise ValueError unless ``grad`` is one of ``GRAD_MODES``; ``where`` names the caller."""
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"{where}: grad must be one of {GRAD_MODES}, got {grad!r}")


def resolve_grad_mode(grad: str, mode: str | None, where: str) -> str:
    """``grad``, or the deprecated ``mode=`` spelling of it (fbp < 0.2.0), checked."""
    if mode is not None:
        warnings.warn(
            f"{where}: mode= is deprecated since fbp 0.2.0 and will be removed; pass grad={mode!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        if grad != "manual" and grad != mode:
            raise ValueError(f"{where}: got grad={grad!r} and mode={mode!r}; pass grad= only")
        grad = mode
    check_grad_mode(grad, where)
    return grad


def check_per_example(per_example, where: str) -> None:
    if not (isinstance(per_example, bool) or isinstance(per_example, str) and per_example == "vmap"):
        raise ValueError(f"{where}: per_example must be one of {PER_EXAMPLE}, got {per_example!r}")


def check_is_layer(model, where: str) -> None:
    """Raise TypeError unless ``model`` is a layer (``LayerProtocol``); ``where`` names the caller."""
    missing = missing_methods(model)
    if missing:
        hint = "; put the layers in fbp.Sequential([...])" if isinstance(model, (list, tuple)) else ""
        raise TypeError(
            f"{where}: expected a layer (with {', '.join(REQUIRED_METHODS)}), got a {type(model).__name__}, "
            f"which lacks {', '.join(missing)}{hint}"
        )


def check_is_loss(loss, where: str) -> None:
    """Raise TypeError unless ``loss`` has the loss contract (``forward``, ``backward``, ``__call__``)."""
    missing = [m for m in ("forward", "backward") if not callable(getattr(loss, m, None))]
    if missing or not callable(loss):
        raise TypeError(
            f"{where}: expected a loss from fbp.losses (with forward, backward and __call__), "
            f"got a {type(loss).__name__}"
        )


# an error a layer raised on purpose starts with the layer's name: "Dense(10): expected x[..., 784], ..."
_OWN_MESSAGE = re.compile(r"^[A-Za-z_][\w.]*(\(.*?\))?: ")
_FIT_CHECKED: set = set()  # (model, params avals, x aval) already found to fit: checked once per signature


def _owner(model, path: str) -> str:
    """The layer a params path belongs to, as ``"[2] Dense(8)"``: through Sequential's list and Residual's block."""
    where, layer = "", model
    while True:
        index = re.match(r"^\[(\d+)\]", path)
        layers = getattr(layer, "layers", None)
        if index and isinstance(layers, tuple) and int(index.group(1)) < len(layers):
            where, layer, path = where + index.group(0), layers[int(index.group(1))], path[index.end() :]
        elif hasattr(getattr(layer, "block", None), "backward"):
            where, layer = where + ".block", layer.block
        else:
            return f"{where} {describe(layer)}" if where else describe(layer)


def check_params(model, params, x) -> None:
    """Raise TypeError/ValueError when a params leaf does not fit ``model`` at ``x``, naming the leaf and its layer.

    Each leaf is compared with what ``model.init`` makes for ``x`` (shapes only,
    ``jax.eval_shape``): a leaf that should be floating but is not (integer
    params: no gradient) is a TypeError; a leaf of another shape is a
    ValueError, unless the model's own forward pass already says what it
    expected (a layer's message, e.g. ``Dense(10): expected x[..., 784]``,
    which names x when x is what differs). A params tree of another structure
    is left to the layers (``Sequential(3 layers): expected params as a list
    of 3``), and so is a model that cannot be initialised for ``x``. Runs at
    trace time, once per signature.
    """
    x_spec = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        signature = (model, treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves), x_spec)
        if signature in _FIT_CHECKED:
            return
    except TypeError:  # an unhashable user layer, or leaves that are not arrays: check every time
        signature = None
    try:
        expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_spec)
    except Exception:  # noqa: BLE001 - the model cannot be initialised for this x: its forward says why
        return
    want = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    misshapen = []
    for path, spec in want.items():
        if path not in got:
            continue
        leaf = got[path]
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"{describe(model)}: params{path} (in {_owner(model, path)}) is a {type(leaf).__name__}, "
                f"expected an array of shape {tuple(spec.shape)}; pass the params that model.init(key, x) returned"
            )
        if jnp.issubdtype(spec.dtype, jnp.inexact) and not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                f"{describe(model)}: params{path} (in {_owner(model, path)}) has dtype {leaf.dtype}, expected a "
                f"floating-point array (init makes {spec.dtype}): integer params have no gradient; cast them, e.g. "
                "jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)"
            )
        if tuple(leaf.shape) != tuple(spec.shape):
            misshapen.append((path, tuple(leaf.shape), tuple(spec.shape)))
    if misshapen:
        path, shape, want_shape = misshapen[0]
        message = (
            f"{describe(model)}: params{path} (in {_owner(model, path)}) has shape {shape}, but init makes "
            f"{want_shape} for x of shape {tuple(jnp.shape(x))}"
            + (f" ({len(misshapen) - 1} more leaves differ)" if len(misshapen) > 1 else "")
            + "; pass the params that model.init(key, x) returned"
        )
        try:
            jax.eval_shape(lambda p, x: model.apply(p, x), params, x)
        except (ValueError, TypeError) as error:
            if _OWN_MESSAGE.match(str(error)):
                raise  # a layer's own message: it names what it expected and what came
            raise ValueError(message) from error
        raise ValueError(message)
    if signature is not None:
        if len(_FIT_CHECKED) > 4096:  # a cache, not a record: keep it bounded
            _FIT_CHECKED.clear()
        _FIT_CHECKED.add(signature)


def check_batch(model, x, y) -> None:
    """Raise ValueError unless x and y have a leading batch axis of the same size."""
    x_shape, y_shape = jnp.shape(x), jnp.shape(y)
    if len(x_shape) < 1 or len(y_shape) < 1:
        raise ValueError(
            f"{describe(model)}: expected batched x and y (a leading batch axis), got shapes {x_shape} and {y_shape}"
        )
    if x_shape[0] != y_shape[0]:
        raise ValueError(
            f"{describe(model)}: x and y must have the same batch size, got x {x_shape} "
            f"(batch {x_shape[0]}) and y {y_shape} (batch {y_shape[0]})"
        )
    if x_shape[0] == 0:
        raise ValueError(f"{describe(model)}: the batch is empty (x has shape {x_shape})")


def check_mask(model, x, mask) -> None:
    """Raise unless ``mask`` is ``(batch,)``, bool or numeric, for ``x: (batch, ...)`` (trace time)."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"{describe(model)}: mask must be an array of shape (batch,), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(jnp.shape(x)[:1]):
        raise ValueError(
            f"{describe(model)}: mask must have shape (batch,) = {tuple(jnp.shape(x)[:1])} for x of shape "
            f"{tuple(jnp.shape(x))}, got {tuple(mask.shape)}"
        )
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
        raise TypeError(f"{describe(model)}: mask must be bool (True: a real example), got dtype {mask.dtype}")


def check_normalize_by(normalize_by, where: str) -> None:
    if normalize_by is None:
        return
    if isinstance(normalize_by, bool) or not isinstance(normalize_by, (int, float, np.number)) or not normalize_by > 0:
        raise ValueError(
            f"{where}: normalize_by must be a positive number (DP-SGD with Poisson sampling: the expected batch "
            f"size q N) or None (the number of examples), got {normalize_by!r}"
        )
