"""The layer protocol, stated once (``LayerProtocol``), and the helpers fbp's layers share.

Read ``LayerProtocol`` to learn how to write a layer; subclass ``Layer`` for its
defaults. The helpers below are the fallbacks the protocol promises (per-example
norms and weighted gradients by vmap) and small checks used by every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays: {} for layers without parameters
Cache = Any  # a pytree of arrays: whatever backward needs

REQUIRED_METHODS = ("init", "apply", "forward", "backward")


class Child(NamedTuple):
    """One direct sub-layer of a combinator, as it runs in a forward pass (see ``LayerProtocol.children``).

    Attributes:
      path: where it sits, appended to the parent's path: ``"[0]"`` (Sequential), ``".block"`` (Residual).
      layer: the sub-layer.
      params: its parameters (a part of the parent's).
      x: the input it sees in the parent's forward pass.
      key: the PRNG key it gets (None when the parent got none).
    """

    path: str
    layer: Any
    params: Params
    x: Any
    key: jax.Array | None


@runtime_checkable
class LayerProtocol(Protocol):
    """What every fbp layer is. Anything with these four methods composes with fbp.

    A layer is a frozen (hashable) dataclass of hyper-parameters; all state
    travels in ``params`` and ``cache`` pytrees that the caller holds. Layers
    accept any number of leading axes, ``x: (..., features)``, and treat them as
    independent examples: the per-example paths below rely on it.

    Required::

        params = layer.init(key, x)                      # x: array or jax.ShapeDtypeStruct
        y = layer.apply(params, x, *, key=None)          # forward only
        y, cache = layer.forward(params, x, *, key=None) # cache: what backward needs
        dparams, dx = layer.backward(params, cache, dy)  # the hand-written VJP

    - ``init``: params shaped for ``x: (..., in)``; ``{}`` without parameters.
      Shapes and dtypes only are read, so ``x`` may be a ShapeDtypeStruct.
    - ``apply``/``forward``: ``key`` is a PRNG key for layers that draw random
      numbers (Dropout); every other layer accepts and ignores it, so callers
      pass keys without asking. No key means inference mode. A combinator
      splits its key among its sub-layers (``split_key``). Whether a model
      draws random numbers is read from its trace (``uses_key``), never declared.
    - ``backward``: ``dy`` is shaped like ``y``; returns ``dparams`` shaped like
      ``params`` (summed over every leading axis) and ``dx`` shaped like ``x``,
      or ``dx = None`` for a discrete input (Embedding ids). Never call
      jax.grad/vjp here: this is the thing the checker checks.
    - Bad configuration or input raises ValueError/TypeError at trace time,
      naming the layer (``describe(layer)``), what was expected, what came and
      how to fix it.

    Optional hooks (per-example gradients at the cost of a batch gradient; ``dy``
    and the cache cover a batch ``(batch, ...)``, ``dy[i]`` the gradient of
    example i's own loss). Each has a fallback, so a layer without them still
    works everywhere, only slower:

    - ``per_example_sq_norms(params, cache, dy) -> (batch,)``: the squared L2
      norm of each example's parameter gradient g_i, all leaves together, in at
      least float32. Fallback (``call_per_example_sq_norms``): zeros without
      parameters, else jax.vmap of ``backward`` over single examples (every
      cache leaf must then have the batch as its first axis).
    - ``per_example_weighted_grads(params, cache, dy, weights) -> dparams``:
      ``sum_i weights[i] g_i`` for ``weights: (batch,)``, shaped like params.
      Fallback: ``backward`` with each example's dy scaled by its weight
      (backward is linear in dy and examples do not mix). Dense and Conv2D
      weigh their input instead (``weighted_grads_from_input``).
    - ``per_example_backward(params, cache, dy) -> (sq_norms, dx, weighted_grads)``:
      for combinators (and layers with an expensive backward, such as the
      recurrent ones), one backward walk giving the two above for the whole
      layer, with ``weighted_grads(weights) -> dparams``. Fallback
      (``call_per_example_backward``): ``backward`` for dx, then the two hooks
      above or their fallbacks (for a combinator without it: on the whole).

    Combinators (layers made of layers) also implement::

        children(params, x, *, key=None) -> list[Child]

    each direct sub-layer in forward order with the params, input and key it
    gets in this forward pass (``Child(path, layer, params, x, key)``). It is
    the one method a user-written combinator implements so that the checker's
    first-wrong-layer search descends into it layer by layer; a layer without
    ``children`` is a leaf, checked as a whole.
    """

    def init(self, key: jax.Array, x: Any) -> Params: ...

    def apply(self, params: Params, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array: ...

    def forward(self, params: Params, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, Cache]: ...

    def backward(self, params: Params, cache: Cache, dy: jax.Array) -> tuple[Params, jax.Array | None]: ...


class Layer:
    """Optional base class for a layer (the contract is ``LayerProtocol``).

    Gives a parameterless ``init``, an ``apply`` that is ``forward`` without
    the cache (override it when the forward pass can skip work the cache
    needs), ``layer(params, x, key=k)`` as ``apply``, and ``name``. Subclasses
    are frozen dataclasses that implement ``forward`` and ``backward``.
    """

    def init(self, key: jax.Array, x: Any) -> Params:
        """Parameterless by default."""
        del key, x
        return {}

    def apply(self, params: Params, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.forward(params, x, key=key)[0]

    def __call__(self, params: Params, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.apply(params, x, key=key)

    @property
    def name(self) -> str:
        return describe(self)


def missing_methods(layer: Any) -> list[str]:
    """The required protocol methods ``layer`` lacks: ``[]`` for a layer."""
    return [m for m in REQUIRED_METHODS if not callable(getattr(layer, m, None))]


def describe(layer: Any) -> str:
    """Short name for messages: the class and its non-default fields, e.g. ``Dense(10)``."""
    if not dataclasses.is_dataclass(layer):
        return type(layer).__name__
    parts = []
    for field in dataclasses.fields(layer):
        if not field.repr:
            continue
        value = getattr(layer, field.name)
        has_default = field.default is not dataclasses.MISSING
        if has_default and value == field.default:
            continue
        if isinstance(value, (tuple, list)) and value and hasattr(value[0], "backward"):
            text = f"{len(value)} layers"
        elif hasattr(value, "backward"):
            text = describe(value)
        else:
            text = repr(value)
        parts.append(text if not has_default else f"{field.name}={text}")
    return f"{type(layer).__name__}({', '.join(parts)})"


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys from ``key``, or ``n`` Nones when there is no key (inference mode)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def uses_key(layer: Any, params: Params, x: Any, key: jax.Array | None = None) -> bool:
    """Whether the output of ``layer.apply(params, x, key=k)`` depends on ``k``: the layer draws random numbers.

    Read from a trace of ``apply`` on shapes alone (no flag to declare, no
    computation): the key counts only if something the output needs reads it,
    so a combinator that splits a key for deterministic layers does not. A
    user-written layer that ignores its key counts as deterministic. ``key``
    gives the key's type (default: a raw PRNGKey).
    """
    abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    key = jax.random.PRNGKey(0) if key is None else key
    jaxpr = jax.make_jaxpr(lambda p, x, k: layer.apply(p, x, key=k))(
        jax.tree_util.tree_map(abstract, params), abstract(x), jax.ShapeDtypeStruct(key.shape, key.dtype)
    ).jaxpr
    is_var = lambda v: isinstance(v, jax.extend.core.Var)
    needed = {v for v in jaxpr.outvars if is_var(v)}
    for eqn in reversed(jaxpr.eqns):  # walk back from the output: what it needs, transitively
        if eqn.effects or any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if is_var(v))
    return jaxpr.invars[-1] in needed


# --- checks and small helpers shared by the layers ---------------------------


def is_concrete(x) -> bool:
    """Whether ``x`` holds values (a numpy or jax array outside a trace), so value checks can run."""
    return not isinstance(x, jax.core.Tracer) and isinstance(x, (np.ndarray, jax.Array))


def check_array(layer: Any, x, *, min_ndim: int = 1, what: str = "x") -> None:
    """Raise TypeError unless ``x`` is an array-like with a shape and a dtype of rank >= min_ndim."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{describe(layer)}: expected {what} to be an array, got {type(x).__name__}")
    if len(x.shape) < min_ndim:
        raise ValueError(
            f"{describe(layer)}: expected {what} of rank >= {min_ndim}, got shape {tuple(x.shape)}"
        )


def check_features(layer: Any, x, features: int) -> None:
    """Raise ValueError unless ``x: (..., features)``: the width a layer's params were made for."""
    if x.shape[-1] != features:
        raise ValueError(f"{describe(layer)}: expected x[..., {features}], got shape {tuple(x.shape)}")


def check_float(layer: Any, x, *, what: str = "x") -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{describe(layer)}: expected a floating-point {what}, got dtype {x.dtype}; "
            "cast with x.astype(jnp.float32)"
        )


def param_dtype(x) -> Any:
    """Parameters follow the input's float dtype (float64 input -> float64 params)."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(()).dtype


def sum_leading(a: jax.Array, keep: int) -> jax.Array:
    """Sum over all axes but the last ``keep``: parameter gradients add over examples."""
    return a.sum(axis=tuple(range(a.ndim - keep))) if a.ndim > keep else a


# --- per-example gradients: shared pieces and the protocol's fallbacks -------


def scale_examples(dy: jax.Array, weights: jax.Array) -> jax.Array:
    """``dy[i] * weights[i]`` for every example i: ``dy: (batch, ...)``, ``weights: (batch,)``."""
    return dy * weights.astype(dy.dtype).reshape(-1, *([1] * (dy.ndim - 1)))


def per_example_outer_sq_norms(a: jax.Array, b: jax.Array) -> jax.Array:
    """``||sum_t a[i, t]^T b[i, t]||_F^2`` for every example i, without the matrices when cheaper.

    The parameter gradient of a Dense or Conv2D layer for one example is such a
    sum of outer products (t runs over positions: sequence steps, output pixels).
    One position: the norm of an outer product is the product of the norms.
    Several: the Gram form ``sum_{t,s} (a_t . a_s)(b_t . b_s)`` (Goodfellow 2015;
    Li et al. 2021, ghost clipping) or the matrix itself, whichever costs less.

    Args:
      a: ``(batch, T, I)``. b: ``(batch, T, O)``.

    Returns:
      ``(batch,)`` squared Frobenius norms, in at least float32.
    """
    return per_example_outer(a, b)[0]


def per_example_outer(a: jax.Array, b: jax.Array) -> tuple[jax.Array, Callable]:
    """``(sq_norms, weighted)`` for per-example gradients ``g_i = sum_t a[i, t]^T b[i, t]``: one clipping walk.

    ``sq_norms: (batch,)`` as ``per_example_outer_sq_norms`` describes (in at
    least float32); ``weighted(weights) = sum_i weights[i] g_i``, ``(I, O)`` in
    b's dtype. Where the norms take the matrix form, the per-example matrices
    computed for them are kept and ``weighted`` is their weighted sum
    (book-keeping, Bu et al. 2023): the clipped gradient then costs no second
    x^T dy. In the Gram or one-position form no matrix exists and ``weighted``
    is ``(weights a)^T b`` over every example and position.

    Args:
      a: ``(batch, T, I)``. b: ``(batch, T, O)``.
    """
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    steps, n_in, n_out = a.shape[1], a.shape[2], b.shape[2]
    if steps == 1 or steps * (n_in + n_out) < n_in * n_out:
        a32, b32 = a.astype(dtype), b.astype(dtype)
        if steps == 1:
            sq_norms = jnp.sum(a32 * a32, axis=(1, 2)) * jnp.sum(b32 * b32, axis=(1, 2))
        else:
            gram_a = jnp.einsum("bti,bsi->bts", a32, a32)
            gram_b = jnp.einsum("bto,bso->bts", b32, b32)
            sq_norms = jnp.sum(gram_a * gram_b, axis=(1, 2))
        return sq_norms, lambda weights: scale_examples(a, weights).reshape(-1, n_in).T @ b.reshape(-1, n_out)
    g = jnp.einsum("bti,bto->bio", a, b, preferred_element_type=dtype)
    return jnp.sum(g * g, axis=(1, 2)), lambda weights: jnp.tensordot(weights.astype(dtype), g, 1).astype(b.dtype)


def per_example_bias_grads(dy: jax.Array) -> jax.Array:
    """Each example's gradient of a bias added at every position: ``dy: (batch, ..., features) -> (batch, features)``."""
    return dy.reshape(dy.shape[0], -1, dy.shape[-1]).sum(axis=1)


def per_example_bias_sq_norms(dy: jax.Array) -> jax.Array:
    """``||db_i||^2`` for every example i of ``dy: (batch, ..., features)``: ``(batch,)`` in at least float32."""
    db = per_example_bias_grads(dy).astype(jnp.promote_types(dy.dtype, jnp.float32))
    return jnp.sum(db * db, axis=1)


def weighted_grads_from_input(layer: Any, params: Params, x: jax.Array, dy: jax.Array, weights: jax.Array) -> Params:
    """``sum_i weights[i] g_i`` for a layer y = f(x; W) + b whose cache is ``x`` (Dense, Conv2D).

    dW is linear in x, so ``backward`` on the weighted input gives the weighted
    dW; the bias gradient sums dy, so ``b`` (when ``params`` has one) is redone
    as ``weights^T db_i``. Weighing x rather than dy leaves dy as the plain
    backward has it, which XLA compiles as well as the plain backward (a
    weighted dy feeding the matmul or convolution can cost it a fused producer:
    on CPU it split Conv2D's pooling backward, four times slower).

    Args:
      layer: the layer; ``layer.backward(params, x, dy)`` must accept its input as the cache.
      x: ``(batch, ...)`` the layer's input. dy: ``(batch, ..., features)``. weights: ``(batch,)``.
    """
    dparams, _ = layer.backward(params, scale_examples(x, weights), dy)
    if "b" in dparams:
        dparams["b"] = weights.astype(dy.dtype) @ per_example_bias_grads(dy)
    return dparams


def call_per_example_sq_norms(layer: Any, params: Params, cache: Cache, dy: jax.Array) -> jax.Array:
    """``layer.per_example_sq_norms`` or its fallback (``LayerProtocol``): ``(batch,)``.

    ``dy`` is ``(batch, ...)``, the gradient of the loss of each example on its
    own; the cache comes from ``layer.forward`` on the batch. A layer without
    parameters gives zeros; a layer without the hook falls back to jax.vmap of
    its backward over single examples, which needs every cache leaf to have
    the batch as its first axis.
    """
    batch = dy.shape[0]
    zeros = jnp.zeros((batch,), jnp.promote_types(dy.dtype, jnp.float32))
    if not jax.tree_util.tree_leaves(params):
        return zeros
    hook = getattr(layer, "per_example_sq_norms", None)
    if hook is not None:
        return hook(params, cache, dy)

    def one(cache_i, dy_i):
        dparams, _ = layer.backward(params, cache_i, dy_i)
        return sum(jnp.sum(jnp.square(g.astype(zeros.dtype))) for g in jax.tree_util.tree_leaves(dparams))

    return jax.vmap(one)(cache, dy)


def call_per_example_backward(layer: Any, params: Params, cache: Cache, dy: jax.Array):
    """``layer.per_example_backward`` or its fallback (``LayerProtocol``): one backward walk for clipping.

    Returns ``(sq_norms, dx, weighted_grads)``: ``sq_norms: (batch,)`` the
    squared norm of each example's parameter gradient, ``dx`` as from
    ``layer.backward``, and ``weighted_grads(weights)`` = sum_i weights[i] g_i,
    shaped like params. Examples do not mix and backward is linear in dy, so
    scaling example i's dy by weights[i] at every layer scales its gradient:
    ``weighted_grads`` reuses each layer's dy from this walk (book-keeping, Bu
    et al. 2022) instead of walking back again. Under jit, XLA keeps only dx of
    the first call to each backward and only the parameter gradients of the
    second.
    """
    own = getattr(layer, "per_example_backward", None)
    if own is not None:
        return own(params, cache, dy)
    _, dx = layer.backward(params, cache, dy)
    hook = getattr(layer, "per_example_weighted_grads", None)

    def weighted_grads(weights):
        if hook is not None:
            return hook(params, cache, dy, weights)
        return layer.backward(params, cache, scale_examples(dy, weights))[0]

    return call_per_example_sq_norms(layer, params, cache, dy), dx, weighted_grads
