"""No false positives: a correct model built from fbp's layers always passes the checker.

Hypothesis draws random models (MLPs with residual blocks and LayerNorm, CNNs
with conv / pooling, models that start with an Embedding; and, in their own
tests, sequence models: Conv1D, SimpleRNN / GRU / LSTM, one- or two-way, every
step or the last one, attention, causal or not, RMSNorm, PositionalEmbedding,
TransformerBlock, on ``(batch, time, features)``, and a token language model),
shapes, batch sizes and sequence lengths (1 included), seeds, losses and the
precision of params and inputs (float64, float32, bfloat16). Every one must
pass ``fbp.check_gradients``, and ``find_first_bad_layer`` (run on fewer draws:
it checks every layer) must blame no layer and no loss.

Non-differentiable points (a ReLU input at exactly 0, a max-pool window whose
maximum is tied) are where the hand-written subgradient and finite differences
may honestly disagree. Inputs and weights are drawn from continuous
distributions, so in exact arithmetic a tie has probability 0; in floating
point it does not, so ``_has_tie`` looks for one in the forward pass actually
computed and ``assume`` discards that draw (it is a genuine kink, not a false
positive). Near-kinks that a finite-difference step straddles are the
checker's own business: it detects them (one-sided differences disagree) and
retries with a smaller step, see fbp/check/finite_diff.py.

Set ``FBP_PROPERTY_EXAMPLES`` to run more draws than the default (docs/checker.md
lists the long runs done).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fbp
from fbp.check import find_first_bad_layer

EXAMPLES = int(os.environ.get("FBP_PROPERTY_EXAMPLES", "10"))
DTYPES = ("float64", "float32", "bfloat16")
ACTIVATIONS = {
    "relu": fbp.ReLU,
    "leaky_relu": fbp.LeakyReLU,
    "tanh": fbp.Tanh,
    "sigmoid": fbp.Sigmoid,
    "gelu": fbp.GELU,
}
VECTOR_BLOCKS = ("dense", "layernorm", "residual", "dropout", *ACTIVATIONS)
IMAGE_BLOCKS = ("conv", "conv_stride2", "residual_conv", "maxpool", "avgpool", "layernorm", *ACTIVATIONS)
SEQUENCE_BLOCKS = (
    "conv1d",
    "rnn",
    "gru",
    "lstm",
    "rnn_bidirectional",
    "gru_bidirectional",
    "lstm_bidirectional",
    "rnn_last",
    "gru_last",
    "lstm_bidirectional_last",
    "attention",
    "attention_causal",
    "rmsnorm",
    "positional",
    "transformer",
    "transformer_bidirectional",
    "relu",
    "gelu",
)
TOKEN_BLOCKS = ("transformer", "transformer_bidirectional", "attention_causal", "rmsnorm")
FAMILIES = ("mlp", "cnn", "embedding")
SEQUENCE_FAMILIES = ("sequence", "tokens")
VOCABULARY = 5  # token ids and the token model's classes
LOSSES = ("cross_entropy_labels", "cross_entropy_probs", "mse", "bce", "log_softmax_mse", "softmax_mse")


@dataclass(frozen=True)
class Spec:
    """Everything that determines one random case; ``build`` turns it into arrays."""

    family: str  # "mlp", "cnn" or "embedding"; "sequence" or "tokens" (SEQUENCE_FAMILIES)
    blocks: tuple[str, ...]
    width: int
    batch: int
    loss: str  # "tokens": always per-position labels, (batch, time)
    dtype: str
    seed: int
    time: int = 3  # sequence length ("embedding" always 3)


@st.composite
def specs(draw, dtypes=DTYPES, families=FAMILIES) -> Spec:
    family = draw(st.sampled_from(families))
    pool = {"cnn": IMAGE_BLOCKS, "sequence": SEQUENCE_BLOCKS, "tokens": TOKEN_BLOCKS}.get(family, VECTOR_BLOCKS)
    sequence = family in SEQUENCE_FAMILIES
    return Spec(
        family=family,
        blocks=tuple(draw(st.lists(st.sampled_from(pool), min_size=0, max_size=2 if sequence else 4))),
        width=draw(st.integers(1, 6)),
        batch=draw(st.integers(1, 4)),
        loss="cross_entropy_labels" if family == "tokens" else draw(st.sampled_from(LOSSES)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        **({"time": draw(st.integers(1, 4))} if sequence else {}),
    )


def _vector_block(name: str, width: int):
    if name == "dense":
        return fbp.Dense(width)
    if name == "layernorm":
        return fbp.LayerNorm()
    if name == "residual":
        return fbp.Residual(fbp.Sequential([fbp.Dense(width), fbp.Tanh(), fbp.Dense(width)]))
    if name == "dropout":
        return fbp.Dropout(0.5)  # no key is passed: the identity, as at inference
    return ACTIVATIONS[name]()


def _image_blocks(names, width: int, size: int):
    """Image layers, skipping a stride or pool that would shrink the image below 2x2."""
    layers = []
    for name in names:
        if name in ("conv_stride2", "maxpool", "avgpool") and size < 4:
            continue
        if name == "conv":
            layers.append(fbp.Conv2D(width, kernel_size=3))
        elif name == "conv_stride2":
            layers.append(fbp.Conv2D(width, kernel_size=3, stride=2, padding="VALID" if size % 2 else "SAME"))
            size = (size - 3) // 2 + 1 if size % 2 else size // 2
        elif name == "residual_conv":
            layers.append(fbp.Residual(fbp.Sequential([fbp.Conv2D(width, kernel_size=3), fbp.Tanh()])))
        elif name == "maxpool":
            layers.append(fbp.MaxPool2D(2))
            size //= 2
        elif name == "avgpool":
            layers.append(fbp.AvgPool2D(2, stride=1))
            size -= 1
        elif name == "layernorm":
            layers.append(fbp.LayerNorm())
        else:
            layers.append(ACTIVATIONS[name]())
    return layers


def _heads(width: int) -> int:
    return 2 if width % 2 == 0 else 1  # d_model must divide by num_heads


def _sequence_blocks(names, width: int, max_length: int):
    """Layers on ``(..., time, width)``; a recurrent "_last" drops the time axis, and the blocks that need
    one are skipped after it. Returns (layers, whether the time axis is still there)."""
    recurrent = {"rnn": fbp.SimpleRNN, "gru": fbp.GRU, "lstm": fbp.LSTM}
    layers, has_time = [], True
    for name in names:
        kind, *flags = name.split("_")
        if kind in recurrent:
            if not has_time:
                continue
            bidirectional, last = "bidirectional" in flags, "last" in flags
            hidden = max(1, width // 2) if bidirectional else width  # the output, (2 if bidirectional) * hidden
            layers.append(recurrent[kind](hidden, bidirectional=bidirectional, return_sequences=not last))
            has_time = not last
        elif name == "rmsnorm":
            layers.append(fbp.RMSNorm())
        elif name in ACTIVATIONS:
            layers.append(ACTIVATIONS[name]())
        elif not has_time:
            continue
        elif name == "conv1d":
            layers.append(fbp.Conv1D(width, kernel_size=3))
        elif kind == "attention":
            layers.append(fbp.MultiHeadAttention(_heads(width), causal="causal" in flags))
        elif name == "positional":
            layers.append(fbp.PositionalEmbedding(max_length))
        else:  # transformer; its MLP kept tiny. Heads: 1 for an odd width, so 2 * (width // 2) divides too
            layers.append(fbp.TransformerBlock(_heads(width), mlp_ratio=2, causal="bidirectional" not in flags))
    return layers, has_time


def _build_sequence(spec: Spec):
    """``build`` for SEQUENCE_FAMILIES: a model on ``(batch, time, features)`` floats, or on token ids."""
    dtype, width, classes = jnp.dtype(spec.dtype), spec.width, 3
    if spec.family == "tokens":  # a language model: a distribution over the next token at every position
        blocks, _ = _sequence_blocks(spec.blocks, width, spec.time)
        layers = [
            fbp.Embedding(VOCABULARY, width, dtype=dtype),
            fbp.PositionalEmbedding(spec.time),
            fbp.TransformerBlock(_heads(width), mlp_ratio=2),
            *blocks,
            fbp.RMSNorm(),
            fbp.Dense(VOCABULARY),
        ]
        loss = fbp.SoftmaxCrossEntropy()
    else:
        # a recurrent layer's width is its own: open and keep `width` with Dense / Conv1D / attention / blocks
        blocks, has_time = _sequence_blocks(spec.blocks, width, spec.time)
        layers = [fbp.Dense(width), *blocks, *([fbp.Flatten(num_axes=2)] if has_time else [])]
        layers.append(fbp.Dense(1 if spec.loss == "bce" else classes))
        layers += {"log_softmax_mse": [fbp.LogSoftmax()], "softmax_mse": [fbp.Softmax()]}.get(spec.loss, [])
        loss = {
            "bce": fbp.BinaryCrossEntropy(),
            "cross_entropy_labels": fbp.SoftmaxCrossEntropy(),
            "cross_entropy_probs": fbp.SoftmaxCrossEntropy(),
        }.get(spec.loss, fbp.MSE())
    model = fbp.Sequential(layers)

    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(spec.seed), 3)
    if spec.family == "tokens":
        x = jax.random.randint(key_x, (spec.batch, spec.time), 0, VOCABULARY)
        y = jax.random.randint(key_y, (spec.batch, spec.time), 0, VOCABULARY)
    else:
        x = jax.random.normal(key_x, (spec.batch, spec.time, 2), jnp.float32).astype(dtype)
        if spec.loss == "cross_entropy_labels":
            y = jax.random.randint(key_y, (spec.batch,), 0, classes)
        elif spec.loss == "bce":
            y = jax.random.bernoulli(key_y, 0.5, (spec.batch, 1)).astype(dtype)
        else:
            y = jax.random.normal(key_y, (spec.batch, classes), jnp.float32)
            y = (jax.nn.softmax(y) if spec.loss == "cross_entropy_probs" else y).astype(dtype)
    return model, loss, model.init(key_params, x), x, y


def build(spec: Spec):
    """``(model, loss, params, x, y)`` for a spec; call inside ``jax.enable_x64`` for float64."""
    if spec.family in SEQUENCE_FAMILIES:
        return _build_sequence(spec)
    dtype, width, classes = jnp.dtype(spec.dtype), spec.width, 3
    if spec.family == "mlp":
        # a residual block keeps the width: open with a Dense so the width is `width`
        layers = [fbp.Dense(width)] + [_vector_block(name, width) for name in spec.blocks]
    elif spec.family == "cnn":
        layers = [fbp.Conv2D(width, kernel_size=3), *_image_blocks(spec.blocks, width, 6), fbp.Flatten()]
    else:
        layers = [fbp.Embedding(5, width, dtype=dtype)] + [_vector_block(name, width) for name in spec.blocks]
        layers.append(fbp.Flatten(num_axes=2))
    layers.append(fbp.Dense(1 if spec.loss == "bce" else classes))
    layers += {"log_softmax_mse": [fbp.LogSoftmax()], "softmax_mse": [fbp.Softmax()]}.get(spec.loss, [])
    model = fbp.Sequential(layers)
    loss = {
        "bce": fbp.BinaryCrossEntropy(),
        "cross_entropy_labels": fbp.SoftmaxCrossEntropy(),
        "cross_entropy_probs": fbp.SoftmaxCrossEntropy(),
    }.get(spec.loss, fbp.MSE())

    def data(key):
        key_x, key_y, key_params = jax.random.split(key, 3)
        if spec.family == "embedding":
            x = jax.random.randint(key_x, (spec.batch, 3), 0, 5)
        else:
            shape = (spec.batch, 4) if spec.family == "mlp" else (spec.batch, 6, 6, 2)
            x = jax.random.normal(key_x, shape, jnp.float32).astype(dtype)
        if spec.loss == "cross_entropy_labels":
            y = jax.random.randint(key_y, (spec.batch,), 0, classes)
        elif spec.loss == "bce":
            y = jax.random.bernoulli(key_y, 0.5, (spec.batch, 1)).astype(dtype)
        else:  # probabilities (made in float32: they sum to 1 only to float32 rounding) or regression targets
            y = jax.random.normal(key_y, (spec.batch, classes), jnp.float32)
            y = (jax.nn.softmax(y) if spec.loss == "cross_entropy_probs" else y).astype(dtype)
        return model.init(key_params, x), x, y

    return model, loss, *data(jax.random.PRNGKey(spec.seed))  # eagerly: its small ops are compiled once, cached


def _has_tie(model, params, x) -> bool:
    """True when some ReLU / LeakyReLU sees an exact 0 or a max-pool window has a tied maximum."""

    def ties(params, x):
        found = [jnp.zeros((), bool)]
        for layer, p, layer_x in _leaves_with_inputs(model, params, x):
            if isinstance(layer, (fbp.ReLU, fbp.LeakyReLU)):
                found.append(jnp.any(layer_x == 0))
            if isinstance(layer, fbp.MaxPool2D):  # window 2, stride 2: the four corners of each window
                y, _ = layer.forward(p, layer_x, key=None)
                ho, wo = y.shape[-3:-1]
                corners = [layer_x[..., i : i + 2 * ho : 2, j : j + 2 * wo : 2, :] for i in (0, 1) for j in (0, 1)]
                found.append(jnp.any(sum((corner == y).astype(jnp.int32) for corner in corners) > 1))
        return jnp.any(jnp.stack(found))

    return bool(jax.jit(ties)(params, x))


def _leaves_with_inputs(layer, params, x):
    """(layer, params, input) for every layer that is not a combinator, in forward order (via ``children``)."""
    children = getattr(layer, "children", None)
    if children is None:
        yield layer, params, x
        return
    for child in children(params, x):
        yield from _leaves_with_inputs(child.layer, child.params, child.x)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_a_correct_model_always_passes(spec):
    _check_passes(spec)


def _check_passes(spec: Spec) -> None:
    with jax.enable_x64(spec.dtype == "float64"):
        model, loss, params, x, y = build(spec)
        assume(not _has_tie(model, params, x))
        report = fbp.check_gradients(model, loss, params, x, y, seed=spec.seed % 1000)
    assert report.ok, f"{spec}\n{report}"


@settings(max_examples=max(EXAMPLES // 5, 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_no_layer_or_loss_of_a_correct_model_is_blamed(spec):
    """The locator, run on a correct model, names nothing: a mutant's named layer is not a false blame."""
    _check_none_blamed(spec)


def _check_none_blamed(spec: Spec) -> None:
    with jax.enable_x64(spec.dtype == "float64"):
        model, loss, params, x, y = build(spec)
        assume(not _has_tie(model, params, x))
        name, report = find_first_bad_layer(model, params, x, loss=loss, y=y, seed=spec.seed % 1000)
    assert name is None, f"{spec}: blamed {name}\n{report}"


# the sequence families in tests of their own, so the draws above keep their number (and their time);
# fewer draws: a scan or attention model costs the checker several times an MLP's compile time
SEQUENCE_EXAMPLES = max(EXAMPLES // 5, 3)


@settings(max_examples=SEQUENCE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(families=SEQUENCE_FAMILIES))
def test_a_correct_sequence_model_always_passes(spec):
    _check_passes(spec)


@settings(max_examples=max(SEQUENCE_EXAMPLES // 3, 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(families=SEQUENCE_FAMILIES))
def test_no_layer_or_loss_of_a_correct_sequence_model_is_blamed(spec):
    _check_none_blamed(spec)


def test_ties_are_detected():
    """The tie filter above is not vacuous: it sees a ReLU zero and a max-pool tie."""
    relu = fbp.Sequential([fbp.ReLU()])
    assert _has_tie(relu, [{}], jnp.array([[1.0, 0.0]]))
    assert not _has_tie(relu, [{}], jnp.array([[1.0, -1.0]]))
    pool = fbp.Sequential([fbp.MaxPool2D(2)])
    tied = jnp.array([[[[1.0], [1.0]], [[0.0], [0.5]]]])
    assert _has_tie(pool, [{}], tied)
    assert not _has_tie(pool, [{}], tied.at[0, 0, 0, 0].set(2.0))


def test_bf16_inputs_with_float32_params_pass():
    """Mixed precision: bfloat16 inputs into float32 params; tolerances follow the lower precision."""
    spec = Spec("mlp", ("tanh", "layernorm", "dense"), 4, 3, "cross_entropy_labels", "float32", 7)
    model, loss, params, x, y = build(spec)
    report = fbp.check_gradients(model, loss, params, x.astype(jnp.bfloat16), y)
    assert report.dtype == "bfloat16"
    assert report.ok, str(report)


def test_every_block_kind_can_be_built():
    """The strategy's vocabulary is all buildable (a typo would silently never be drawn); shapes only."""

    def loss_value(spec):
        model, loss, params, x, y = build(spec)
        return loss(model.apply(params, x), y)

    for family, pool in (("mlp", VECTOR_BLOCKS), ("cnn", IMAGE_BLOCKS), ("embedding", VECTOR_BLOCKS)):
        for loss in LOSSES:
            spec = Spec(family, pool, 3, 2, loss, "float32", 0)
            assert jax.eval_shape(lambda spec=spec: loss_value(spec)).shape == ()
    # a "_last" block drops the time axis and the sequence blocks after it are skipped: each last, once
    keep_time = tuple(name for name in SEQUENCE_BLOCKS if not name.endswith("_last"))
    pools = [("tokens", TOKEN_BLOCKS)] + [
        ("sequence", (*keep_time, name)) for name in SEQUENCE_BLOCKS if name not in keep_time
    ]
    for family, pool in pools:
        for loss in LOSSES if family == "sequence" else ("cross_entropy_labels",):
            for width, time in ((4, 3), (1, 1)):  # even width: two heads; time 1
                spec = Spec(family, pool, width, 2, loss, "float32", 0, time)
                assert jax.eval_shape(lambda spec=spec: loss_value(spec)).shape == ()
