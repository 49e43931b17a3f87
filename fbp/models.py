"""Model specs: a short string (``"mlp:128,128"``, ``"lstm:64"``, ``"transformer:layers=2"``) -> an fbp Sequential.

    model = fbp.models.build("mlp:128,128", input_shape=(8, 8, 1), num_outputs=10)
    # Sequential([Flatten(), Dense(128), ReLU(), Dense(128), ReLU(), Dense(10)])
    model = fbp.models.build_for("lstm:64", fbp.data.load("adding"))   # the shapes from a Dataset

Specs for vectors and images:
  ``mlp[:W1,W2,...]``: Dense layers of those widths with ReLU between, then a
    Dense to the outputs; image inputs are flattened first. Default widths 128,128.
  ``cnn[:C1,C2,...]``: for each C, Conv2D(C, 3) + ReLU + MaxPool2D(2); then Flatten
    and a Dense to the outputs. Needs image inputs ``(H, W, C)``. Default 16,32.

Specs for sequences, inputs ``(time, features)`` floats or ``(time,)`` integer token ids
(then an Embedding comes first; ``num_embeddings`` says how many ids). With one label
per sequence (``per_step=False``) the model ends in one prediction per example; with
a label per step (``per_step=True``: a language model, the copy task) in one per step,
and then no step ever sees a later one (so a language model cannot read its answer):
  ``rnn[:H1,H2,...]``, ``gru[:H1,...]``, ``lstm[:H1,...]``: stacked SimpleRNN / GRU /
    LSTM layers of those hidden sizes (default 64), then Dense on the last state, or
    on every state when ``per_step``. Token ids are embedded to H1 features first.
  ``cnn1d[:C1,C2,...]``: for each C, Conv1D(C, 3) + ReLU (default 32,32), then Flatten
    and a Dense, or a Dense per step when ``per_step``, where the convolutions are
    causal (padding (2, 0): step t sees steps t-2 .. t).
  ``transformer[:key=value,...]``: keys ``d_model`` (default 64), ``layers`` (2),
    ``heads`` (4), ``mlp_ratio`` (4); e.g. ``transformer:d_model=128,layers=4``.
    Embedding(ids, d_model) or Dense(d_model) for float features, PositionalEmbedding(time),
    ``layers`` TransformerBlocks (causal when ``per_step``), RMSNorm, then Dense to the
    outputs per step (a GPT-style language model), or Flatten and Dense.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fbp.layers import Conv1D, Conv2D, Dense, Embedding, Flatten, MaxPool2D, ReLU, Sequential
from fbp.layers.recurrent import GRU, LSTM, SimpleRNN
from fbp.layers.transformer import PositionalEmbedding, RMSNorm, TransformerBlock

DEFAULT_WIDTHS = {"mlp": (128, 128), "cnn": (16, 32), "rnn": (64,), "gru": (64,), "lstm": (64,), "cnn1d": (32, 32)}
RECURRENT = {"rnn": SimpleRNN, "gru": GRU, "lstm": LSTM}
TRANSFORMER_DEFAULTS = {"d_model": 64, "layers": 2, "heads": 4, "mlp_ratio": 4}
KINDS = (*DEFAULT_WIDTHS, "transformer")
_SYNTAX = ("mlp[:W1,W2,...], cnn[:C1,...], rnn[:H1,...], gru[:H1,...], lstm[:H1,...], cnn1d[:C1,...] or "
           "transformer[:d_model=64,layers=2,heads=4,mlp_ratio=4]")


def _parse_transformer(spec: str, options: str) -> dict[str, int]:
    config = dict(TRANSFORMER_DEFAULTS)
    for item in filter(None, (part.strip() for part in options.split(","))):
        name, equals, value = item.partition("=")
        name = name.strip()
        if name not in config or not equals:
            raise ValueError(
                f"model spec {spec!r}: expected key=value pairs with keys {', '.join(TRANSFORMER_DEFAULTS)}, "
                f"e.g. transformer:d_model=128,layers=2; got {item!r}"
            )
        try:
            config[name] = int(value)
        except ValueError:
            config[name] = 0
        if config[name] < 1:
            raise ValueError(f"model spec {spec!r}: {name} must be a positive integer, got {value.strip()!r}")
    if config["d_model"] % config["heads"]:
        raise ValueError(
            f"model spec {spec!r}: d_model {config['d_model']} does not divide by heads {config['heads']}; "
            "pick heads dividing d_model"
        )
    return config


def parse(spec: str) -> tuple[str, tuple[int, ...] | dict[str, int]]:
    """``"mlp:128,64"`` -> ``("mlp", (128, 64))``; a bare kind takes its default widths.

    ``"transformer:layers=4"`` -> ``("transformer", {"d_model": 64, "layers": 4, "heads": 4, "mlp_ratio": 4})``.
    """
    kind, _, widths = spec.strip().partition(":")
    if kind == "transformer":
        return kind, _parse_transformer(spec, widths)
    if kind not in DEFAULT_WIDTHS:
        raise ValueError(f"model spec {spec!r}: expected {_SYNTAX}, got kind {kind!r}")
    if not widths:
        return kind, DEFAULT_WIDTHS[kind]
    try:
        sizes = tuple(int(w) for w in widths.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(w < 1 for w in sizes):
        example = ",".join(str(w) for w in DEFAULT_WIDTHS[kind] * 2)
        raise ValueError(f"model spec {spec!r}: expected positive integer widths after ':', e.g. {kind}:{example}")
    return kind, sizes


def build(
    spec: str, input_shape: tuple[int, ...], num_outputs: int, *, per_step: bool = False,
    num_embeddings: int | None = None,
) -> Sequential:
    """Build the model that ``spec`` names for inputs of ``input_shape`` (no batch axis).

    Args:
      spec: a model spec (see the module docstring).
      input_shape: one example's shape, e.g. ``(8, 8, 1)``, ``(20,)``, ``(50, 2)`` (time, features),
        or ``(64,)`` token ids when ``num_embeddings`` is given.
      num_outputs: logits (classes) or regression targets per example, or per step.
      per_step: sequence specs only: one output per time step ``(batch, time, num_outputs)``, each
        seeing no later step; else one per example ``(batch, num_outputs)``.
      num_embeddings: sequence specs only: the inputs are integer ids in ``[0, num_embeddings)``.

    Returns:
      A Sequential whose output is ``(batch, num_outputs)``, or ``(batch, time, num_outputs)`` with ``per_step``.
    """
    kind, widths = parse(spec)
    input_shape = tuple(input_shape)
    if kind in ("mlp", "cnn"):
        if per_step or num_embeddings is not None:
            raise ValueError(
                f"model {spec!r}: an {kind} makes one prediction per example from float features; for token ids "
                "or a label per time step use a sequence model (rnn, gru, lstm, cnn1d or transformer)"
            )
        return _feedforward(spec, kind, widths, input_shape, num_outputs)
    layers, time = _sequence_input(spec, kind, widths, input_shape, num_embeddings)
    if kind in RECURRENT:
        cell = RECURRENT[kind]
        for i, hidden in enumerate(widths):
            layers.append(cell(hidden, return_sequences=per_step or i < len(widths) - 1))
        layers.append(Dense(num_outputs))
        return Sequential(tuple(layers))
    if kind == "cnn1d":
        for channels in widths:
            layers += [Conv1D(channels, 3, padding=(2, 0) if per_step else "SAME"), ReLU()]
    else:
        layers.append(PositionalEmbedding(time))
        layers += [TransformerBlock(widths["heads"], mlp_ratio=widths["mlp_ratio"], causal=per_step)
                   for _ in range(widths["layers"])]
        layers.append(RMSNorm())
    if not per_step:
        layers.append(Flatten(num_axes=2))
    layers.append(Dense(num_outputs))
    return Sequential(tuple(layers))


def build_for(spec: str, dataset) -> Sequential:
    """``build`` with the shapes of ``dataset`` (an ``fbp.data.Dataset``): its input shape and outputs,
    a prediction per step when it has a label per step, and an Embedding when its inputs are token ids
    (as many as its classes for text, else the largest id in it + 1)."""
    options = {}  # only what differs from build's defaults: build(spec, shape, outputs) stays the common call
    if dataset.per_step:
        options["per_step"] = True
    if np.issubdtype(dataset.x_train.dtype, np.integer):
        if dataset.vocabulary is not None:
            options["num_embeddings"] = dataset.num_classes
        else:
            options["num_embeddings"] = int(max(dataset.x_train.max(), dataset.x_test.max())) + 1
    return build(spec, dataset.input_shape, dataset.num_outputs, **options)


def _feedforward(spec, kind, widths, input_shape, num_outputs) -> Sequential:
    layers: list = []
    if kind == "mlp":
        if len(input_shape) > 1:
            layers.append(Flatten(num_axes=len(input_shape)))
        for width in widths:
            layers += [Dense(width, weight_init="he"), ReLU()]
    else:
        if len(input_shape) != 3:
            raise ValueError(
                f"model {spec!r}: a cnn needs image inputs (H, W, C), got examples of shape {input_shape}; "
                "use an mlp for vector data"
            )
        height, width = input_shape[:2]
        for channels in widths:
            if min(height, width) < 2:
                raise ValueError(
                    f"model {spec!r}: {len(widths)} conv blocks halve {input_shape[:2]} below 2x2; use fewer blocks"
                )
            layers += [Conv2D(channels, 3), ReLU(), MaxPool2D(2)]
            height, width = height // 2, width // 2
        layers.append(Flatten())
    layers.append(Dense(num_outputs))
    return Sequential(tuple(layers))


def _sequence_input(spec, kind, widths, input_shape, num_embeddings) -> tuple[list, int]:
    """The first layers of a sequence model (an Embedding for ids, a Dense for a transformer's
    features) and the number of time steps; ValueError for inputs that are not sequences."""
    if num_embeddings is not None:
        if len(input_shape) != 1:
            raise ValueError(
                f"model {spec!r}: token ids must be examples of shape (time,), got {input_shape}"
            )
        width = widths["d_model"] if kind == "transformer" else widths[0]
        return [Embedding(num_embeddings, width)], input_shape[0]
    if len(input_shape) != 2:
        raise ValueError(
            f"model {spec!r}: a {kind} needs sequences (time, features) or token ids (time,) with num_embeddings, "
            f"got examples of shape {input_shape}"
        )
    return ([Dense(widths["d_model"])] if kind == "transformer" else []), input_shape[0]


# --- sampling from a trained language model -------------------------------------------------------


def sample(
    model, params, prompt_ids, *, length: int, window: int, key, temperature: float = 1.0,
    exclude: int | None = None,
) -> np.ndarray:
    """Sample ``length`` ids from a model with a prediction per step (a language model), one at a time.

    Each new id is drawn from ``softmax(logits / temperature)`` at the last known position,
    the model reading the last ``window`` ids (its context: the length it was trained on, so
    one compiled shape serves every step; a causal model ignores the unused positions after
    the context). ``temperature=0`` takes the most likely id.

    Args:
      model, params: a model from ``build(..., per_step=True, num_embeddings=V)`` and its parameters.
      prompt_ids: ``(p,)`` int ids to continue, p >= 1.
      length: how many ids to draw.
      window: T, the model's context in ids.
      key: a PRNG key; the same key gives the same sample.
      temperature: >= 0; lower is more conservative.
      exclude: an id never to draw (the unknown character), or None.

    Returns:
      ``(length,)`` int32 ids, without the prompt.
    """
    prompt = np.asarray(prompt_ids, np.int32).ravel()
    if prompt.size < 1:
        raise ValueError("sample: needs a prompt of at least one id")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"sample: length must be a positive int, got {length!r}")
    if not temperature >= 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature!r}")
    buffer = np.zeros(max(window, prompt.size + length), np.int32)
    buffer[: prompt.size] = prompt
    ids = _sample(model, params, jnp.asarray(buffer), prompt.size, key, jnp.float32(temperature), length, window,
                  -1 if exclude is None else exclude)
    return np.asarray(ids)[prompt.size : prompt.size + length]


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _sample(model, params, buffer, start, key, temperature, length: int, window: int, exclude: int):
    def draw(i, buffer):
        known = start + i  # ids known so far; the next goes at index `known`
        first = jnp.maximum(known - window, 0)
        context = jax.lax.dynamic_slice(buffer, (first,), (window,))
        logits = model.apply(params, context[None])[0, known - 1 - first].astype(jnp.float32)
        if exclude >= 0:
            logits = logits.at[exclude].set(-jnp.inf)
        scaled = logits / jnp.maximum(temperature, 1e-6)
        drawn = jax.random.categorical(jax.random.fold_in(key, i), scaled)
        token = jnp.where(temperature > 0, drawn, jnp.argmax(logits)).astype(buffer.dtype)
        return buffer.at[known].set(token)

    return jax.lax.fori_loop(0, length, draw, buffer)
