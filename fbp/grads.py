"""Gradients three ways: the hand-written backward, jax.grad, and both per example.

Everything here returns plain functions of ``(params, x, y, key=None)``; jit
them as you like (the train step does). Two choices run through every function:

- ``grad``, how a gradient is computed (``GRAD_MODES``): ``"manual"`` (the
  model's forward with its cache, the loss's backward, then ``model.backward``:
  the hand-written chain rule), ``"autodiff"`` (jax.grad of ``model.apply``,
  the reference) or ``"custom_vjp"`` (jax.grad through ``with_manual_vjp``:
  the hand-written backward as JAX's VJP).
- ``per_example`` (``PER_EXAMPLE``), whether each example's gradient is taken
  on its own (for clipping): ``False`` the batch gradient; ``True`` the fast
  path, one forward and one backward over the batch that yields what each
  example needs (the per-example hooks of ``LayerProtocol``); ``"vmap"``
  jax.vmap over single examples, materialising every example's gradient: the
  slow, obvious reference that the fast path is checked against.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.layers.base import (
    REQUIRED_METHODS,
    call_per_example_backward,
    describe,
    missing_methods,
    scale_examples,
    uses_key,
)

GRAD_MODES = ("manual", "autodiff", "custom_vjp")
MODES = GRAD_MODES  # the name before fbp 0.2.0
PER_EXAMPLE = (False, True, "vmap")


def check_grad_mode(grad, where: str) -> None:
    """Raise ValueError unless ``grad`` is one of ``GRAD_MODES``; ``where`` names the caller."""
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"{where}: grad must be one of {GRAD_MODES}, got {grad!r}")


def _grad_mode(grad: str, mode: str | None, where: str) -> str:
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


def _check_per_example(per_example, where: str) -> None:
    if not (isinstance(per_example, bool) or isinstance(per_example, str) and per_example == "vmap"):
        raise ValueError(f"{where}: per_example must be one of {PER_EXAMPLE}, got {per_example!r}")


def with_manual_vjp(model) -> Callable:
    """``f(params, x, key=None) = model.apply(params, x)`` whose VJP is ``model.backward``.

    The forward runs ``model.forward`` and keeps its cache as the residual, so
    ``jax.grad``, optax and any JAX transformation use the hand-written gradients.
    A discrete input (Embedding ids) gets a zero cotangent.
    """

    @jax.custom_vjp
    def f(params, x, key):
        return model.apply(params, x, key=key)

    def fwd(params, x, key):
        y, cache = model.forward(params, x, key=key)
        return y, (params, cache)

    def bwd(residuals, dy):
        params, cache = residuals
        dparams, dx = model.backward(params, cache, dy)
        return dparams, dx, None

    f.defvjp(fwd, bwd)

    def apply(params, x, key=None):
        return f(params, x, key)

    return apply


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


def _batch_value_and_grad(model, loss, grad: str) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)`` over the batch, by ``grad`` (checked by the caller)."""
    if grad == "manual":

        def manual(params, x, y, key=None):
            pred, cache = model.forward(params, x, key=key)  # forward pass, keeping the cache
            value, loss_cache = loss.forward(pred, y)
            dpred = loss.backward(loss_cache)  # dL/dpred
            dparams, _ = model.backward(params, cache, dpred)  # the chain rule, layer by layer
            return value, dparams

        return manual
    apply = with_manual_vjp(model) if grad == "custom_vjp" else _apply_of(model)

    def by_jax(params, x, y, key=None):
        return jax.value_and_grad(lambda p: loss(apply(p, x, key), y))(params)

    return by_jax


def _apply_of(model) -> Callable:
    """``model.apply`` as ``f(params, x, key)``, the signature ``with_manual_vjp`` returns."""
    return lambda params, x, key=None: model.apply(params, x, key=key)


def per_example_value_and_grad(model, loss, *, grad: str = "manual", mode: str | None = None) -> Callable:
    """``f(params, x, y, key=None) -> (values, grads)``: every example's loss and gradient, separately.

    By jax.vmap over single examples (every layer accepts an example without a
    batch axis), each computed as ``grad`` says. With a key, example i gets
    ``jax.random.fold_in(key, i)``.

    Args:
      model: any layer. loss: a loss from ``fbp.losses``.
      grad: one of ``GRAD_MODES`` (see the module docstring).
      mode: deprecated spelling of ``grad``.

    Returns:
      ``values: (batch,)``, each example's loss; ``grads`` shaped like params
      with a leading batch axis on every leaf: ``grads[leaf][i]`` is the
      gradient of example i's loss.
    """
    single = _batch_value_and_grad(model, loss, _grad_mode(grad, mode, "per_example_value_and_grad"))
    check_is_layer(model, "per_example_value_and_grad")
    check_is_loss(loss, "per_example_value_and_grad")

    def f(params, x, y, key=None):
        check_batch(model, x, y)
        check_params(model, params, x)
        if key is None:
            return jax.vmap(single, in_axes=(None, 0, 0))(params, x, y)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(jnp.shape(x)[0]))
        return jax.vmap(single, in_axes=(None, 0, 0, 0))(params, x, y, keys)

    return f


def per_example_grads(model, loss, *, grad: str = "manual", mode: str | None = None) -> Callable:
    """``f(params, x, y, key=None) -> grads``: every example's gradient, stacked.

    ``per_example_value_and_grad`` without the values: each leaf of ``grads``
    gains a leading batch axis, ``grads[leaf][i]`` the gradient of example i's
    loss (jax.vmap over single examples; with a key, example i gets
    ``jax.random.fold_in(key, i)``). Before fbp 0.2.0 this returned
    ``(values, grads)``: use ``per_example_value_and_grad`` for both.
    """
    both = per_example_value_and_grad(model, loss, grad=_grad_mode(grad, mode, "per_example_grads"))

    def f(params, x, y, key=None):
        return both(params, x, y, key)[1]

    return f


def _batch_forward_is_per_example(model, params, x, key) -> bool:
    """Whether one forward pass over the batch equals the vmapped single-example forwards.

    It does for fbp layers, which treat leading axes as independent examples,
    unless randomness is drawn: vmap gives example i the key fold_in(key, i).
    """
    return key is None or not uses_key(model, params, x, key)


def _per_example_loss(loss, pred, y):
    """Each example's own loss and its gradient: values ``(batch,)``, dpred shaped like pred.

    The loss of example i alone is a batch of one, so dpred[i] is exactly the
    gradient of example i's loss with respect to its own prediction.
    """

    def one(pred_i, y_i):
        value, cache = loss.forward(pred_i, y_i)
        return value, loss.backward(cache)

    return jax.vmap(one)(pred, y)


def _pullback(model, grad: str) -> Callable:
    """``f(params, x, key) -> (pred, backward)``, ``backward(dpred) -> dparams``, by ``grad`` (checked by the caller)."""

    def pullback(params, x, key):
        if grad == "manual":
            pred, cache = model.forward(params, x, key=key)
            return pred, lambda dpred: model.backward(params, cache, dpred)[0]
        apply = with_manual_vjp(model) if grad == "custom_vjp" else _apply_of(model)
        pred, vjp = jax.vjp(lambda p: apply(p, x, key), params)
        return pred, lambda dpred: vjp(dpred)[0]

    return pullback


def _averaged_per_example(model, loss, grad: str) -> Callable:
    """Mean of per-example gradients as one backward pass over the batch.

    Example i's gradient is backward(cache, e_i dpred_i), linear in dpred_i, and
    the examples do not mix; so the mean over i is backward(cache, dpred / B):
    each layer's backward sums the outer products over the batch in one matmul
    instead of materialising B of them.
    """
    pullback = _pullback(model, grad)

    def averaged(params, x, y, key=None):
        check_batch(model, x, y)
        pred, backward = pullback(params, x, key)
        values, dpred = _per_example_loss(loss, pred, y)
        return values.mean(), backward(dpred / values.shape[0])

    return averaged


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


def _masked(x, y, mask):
    """``(x, y, keep)``: masked examples' rows of x and y replaced by zeros, ``keep: (batch,)`` bool.

    What a masked example holds then never reaches the arithmetic (not even a NaN in the padding),
    so its values change no result, bit for bit; its weight is zero everywhere after.
    """
    keep = jnp.asarray(mask).astype(bool)

    def zero_masked(a):
        a = jnp.asarray(a)
        return jnp.where(keep.reshape(-1, *([1] * (a.ndim - 1))), a, jnp.zeros((), a.dtype))

    return zero_masked(x), zero_masked(y), keep


def _masked_mean_weights(keep, dtype) -> jax.Array:
    """``keep / max(1, count)``: each real example's weight in the mean over real examples (0 when none)."""
    keep = keep.astype(dtype)
    return keep / jnp.maximum(jnp.sum(keep), 1)


def _masked_value_and_grad(model, loss, grad: str, per_example: bool | str) -> Callable:
    """``f(params, x, y, key, mask) -> (mean loss, mean gradient)`` over the examples where ``mask``.

    Each example's loss and dpred alone, weighted by ``mask / count``, then one backward over the
    batch (``_averaged_per_example``'s argument: backward is linear in dpred and examples do not
    mix); the vmap reference (and the fast path of a model drawing random numbers from ``key``)
    weighs the stacked per-example gradients instead.
    """
    pullback = _pullback(model, grad)
    stacked = per_example_value_and_grad(model, loss, grad=grad)

    def masked(params, x, y, key, mask):
        check_batch(model, x, y)
        check_mask(model, x, mask)
        x, y, keep = _masked(x, y, mask)
        vmapped = per_example == "vmap" or (
            per_example is True and not _batch_forward_is_per_example(model, params, x, key)
        )
        if vmapped:
            values, grads = stacked(params, x, y, key)
            weights = _masked_mean_weights(keep, values.dtype)
            values = jnp.where(keep, values, jnp.zeros((), values.dtype))
            return weights @ values, jax.tree_util.tree_map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, 1), grads)
        pred, backward = pullback(params, x, key)
        values, dpred = _per_example_loss(loss, pred, y)
        weights = _masked_mean_weights(keep, values.dtype)
        values = jnp.where(keep, values, jnp.zeros((), values.dtype))  # a zero input's loss could still be inf
        return weights @ values, backward(scale_examples(dpred, weights))

    return masked


def value_and_grad(
    model, loss, *, grad: str = "manual", per_example: bool | str = False, mode: str | None = None
) -> Callable:
    """``f(params, x, y, key=None) -> (loss value, grads)``, ``grads`` shaped like ``params``.

    Args:
      model: any layer (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      grad: ``"manual"`` (forward, loss forward/backward, then ``model.backward``),
        ``"autodiff"`` (jax.value_and_grad over ``model.apply``) or
        ``"custom_vjp"`` (jax.value_and_grad through ``with_manual_vjp``).
      per_example: ``False``: the batch gradient. ``True`` (the fast path): the
        mean of every example's own gradient, each example's loss and dpred
        computed alone, then one backward over the batch with dpred / batch,
        which sums the per-example gradients inside each layer: as fast as the
        batch step, no per-example gradient materialised. ``"vmap"``: the same
        mean by jax.vmap over single examples (``per_example_value_and_grad``),
        materialising every per-example gradient: the reference. ``True`` also
        takes the vmap path when the model draws random numbers from a given
        key, so that example i gets the key fold_in(key, i) on both paths. All
        equal the batch gradient, since the batch loss is the mean of the
        per-example losses.
      mode: deprecated spelling of ``grad``.

    The returned ``f`` also takes ``mask: (batch,)`` (bool; None: every example): the loss and
    gradient are then the mean over the examples where ``mask`` is True, each example's loss
    weighted alone (for padded batches, e.g. Poisson sampling). A masked example contributes
    nothing: its x and y are replaced by zeros before any arithmetic, and its weight is zero.
    """
    grad = _grad_mode(grad, mode, "value_and_grad")
    _check_per_example(per_example, "value_and_grad")
    check_is_layer(model, "value_and_grad")
    check_is_loss(loss, "value_and_grad")
    masked = _masked_value_and_grad(model, loss, grad, per_example)
    if per_example is False:
        batch = _batch_value_and_grad(model, loss, grad)

        def checked(params, x, y, key=None, mask=None):
            check_params(model, params, x)
            if mask is not None:
                return masked(params, x, y, key, mask)
            return batch(params, x, y, key)

        return checked
    stacked = per_example_value_and_grad(model, loss, grad=grad)
    fast = _averaged_per_example(model, loss, grad)

    def averaged(params, x, y, key=None, mask=None):
        check_params(model, params, x)
        if mask is not None:
            return masked(params, x, y, key, mask)
        if per_example is True and _batch_forward_is_per_example(model, params, x, key):
            return fast(params, x, y, key)
        values, grads = stacked(params, x, y, key)
        return values.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)

    return averaged


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
    """``min(1, C / ||g_i||)``: the factor that clips each example's gradient to norm C."""
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def clip_and_average(grads, clip_norm: float):
    """Clip each example's gradient to global L2 norm ``clip_norm``, then average.

    Args:
      grads: per-example gradients, every leaf (batch, ...).
      clip_norm: the bound C.

    Returns:
      (mean of g_i * min(1, C / ||g_i||), per-example norms (batch,)).
    """

    def sq_norms(g):  # (batch,), in at least float32
        g = g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32))
        return jnp.sum(g * g, axis=1)

    norms = jnp.sqrt(sum(sq_norms(g) for g in jax.tree_util.tree_leaves(grads)))
    factor = clip_factors(norms, clip_norm)
    mean = jax.tree_util.tree_map(lambda g: jnp.tensordot(factor.astype(g.dtype), g, axes=1) / g.shape[0], grads)
    return mean, norms


def clipped_value_and_grad(
    model,
    loss,
    clip_norm: float,
    *,
    grad: str = "manual",
    per_example: bool | str = True,
    normalize_by: float | None = None,
    mode: str | None = None,
) -> Callable:
    """``f(params, x, y, key=None, mask=None) -> (loss value, clipped mean gradient, norms)`` for DP-SGD.

    The gradient is ``mean_i g_i min(1, C / ||g_i||)`` with g_i example i's
    gradient and C = ``clip_norm``; ``norms: (batch,)`` holds every ||g_i||.

    With ``mask: (batch,)`` (bool, True for a real example: padded batches such as Poisson
    sampling's), only the examples where ``mask`` count: the gradient is the sum of their clipped
    gradients divided by ``normalize_by`` (or by their number), the loss value their mean loss,
    and a masked example's norm is 0. A masked example contributes nothing, bit for bit: its x and
    y are replaced by zeros before any arithmetic and its weight is zero.

    Args:
      model, loss, grad: as ``value_and_grad``; ``mode``: deprecated spelling of ``grad``.
      clip_norm: the bound C.
      normalize_by: the clipped sum is divided by this; None: by the number of examples (the
        unmasked ones with a mask), i.e. the mean. DP-SGD with Poisson sampling divides by the
        EXPECTED batch size q N, a constant, as the privacy accountant assumes (dividing by the
        drawn batch size would make the noise depend on the data); JAX-Privacy's ``normalize_by``.
      per_example: ``True`` (the fast path): with ``grad="manual"`` no g_i is
        materialised (ghost clipping, Li et al. 2021): one backward walk over
        the batch gets ||g_i||^2 from each layer's ``per_example_sq_norms`` (its
        cache and dy; for Dense, ||x_i|| ||dy_i||), the factors follow, and each
        layer's gradient with its dy scaled by factor_i / B is exactly the
        clipped mean (the dy's of the walk are reused, so there is no second
        walk: ``call_per_example_backward``). ``"vmap"``: the g_i from
        ``per_example_value_and_grad``, clipped and averaged: the reference,
        also taken for ``True`` with the autodiff modes, with a model that
        draws random numbers from a given key, or with a model that has
        neither ``per_example_backward`` nor ``per_example_sq_norms``.
        ``False`` is refused: clipping needs per-example gradients.
    """
    grad = _grad_mode(grad, mode, "clipped_value_and_grad")
    _check_per_example(per_example, "clipped_value_and_grad")
    check_is_layer(model, "clipped_value_and_grad")
    check_is_loss(loss, "clipped_value_and_grad")
    if per_example is False:
        raise ValueError("clipping needs per-example gradients: pass per_example=True or 'vmap'")
    _check_normalize_by(normalize_by, "clipped_value_and_grad")
    stacked = per_example_value_and_grad(model, loss, grad=grad)
    hooks = ("per_example_backward", "per_example_sq_norms")
    ghost = per_example is True and grad == "manual" and any(callable(getattr(model, h, None)) for h in hooks)

    def clipped(params, x, y, key=None, mask=None):
        check_params(model, params, x)
        keep = None
        if mask is not None:
            check_batch(model, x, y)
            check_mask(model, x, mask)
            x, y, keep = _masked(x, y, mask)
        if not (ghost and _batch_forward_is_per_example(model, params, x, key)):
            values, grads = stacked(params, x, y, key)
            if keep is None and normalize_by is None:
                grads, norms = clip_and_average(grads, clip_norm)
                return values.mean(), grads, norms
            norms = _stacked_norms(grads)
            factors, value, denominator = _masked_factors(norms, values, keep, clip_norm, normalize_by)
            grads = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors.astype(g.dtype), g, 1) / denominator, grads)
            return value, grads, norms if keep is None else jnp.where(keep, norms, 0)
        check_batch(model, x, y)
        pred, cache = model.forward(params, x, key=key)
        values, dpred = _per_example_loss(loss, pred, y)
        sq_norms, _, weighted_grads = call_per_example_backward(model, params, cache, dpred)
        norms = jnp.sqrt(sq_norms)
        if keep is None and normalize_by is None:
            return values.mean(), weighted_grads(clip_factors(norms, clip_norm) / values.shape[0]), norms
        factors, value, denominator = _masked_factors(norms, values, keep, clip_norm, normalize_by)
        return value, weighted_grads(factors / denominator), norms if keep is None else jnp.where(keep, norms, 0)

    return clipped


def _check_normalize_by(normalize_by, where: str) -> None:
    if normalize_by is None:
        return
    if isinstance(normalize_by, bool) or not isinstance(normalize_by, (int, float)) or not normalize_by > 0:
        raise ValueError(
            f"{where}: normalize_by must be a positive number (DP-SGD with Poisson sampling: the expected batch "
            f"size q N) or None (the number of examples), got {normalize_by!r}"
        )


def _masked_factors(norms, values, keep, clip_norm: float, normalize_by: float | None):
    """``(factors, loss value, denominator)``: the clip factors, zero where masked; the mean loss over the
    real examples; what the clipped sum is divided by (``normalize_by``, else the number of real examples)."""
    factors = clip_factors(norms, clip_norm)
    if keep is None:
        count = values.shape[0]
        value = values.mean()
    else:
        factors = jnp.where(keep, factors, jnp.zeros((), factors.dtype))
        count = jnp.maximum(jnp.sum(keep.astype(values.dtype)), 1)
        value = jnp.sum(jnp.where(keep, values, jnp.zeros((), values.dtype))) / count
    return factors, value, count if normalize_by is None else normalize_by


def _stacked_norms(grads) -> jax.Array:
    """Each example's gradient norm from stacked per-example gradients: ``(batch,)`` in at least float32."""

    def sq_norms(g):
        g = g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32))
        return jnp.sum(g * g, axis=1)

    return jnp.sqrt(sum(sq_norms(g) for g in jax.tree_util.tree_leaves(grads)))
