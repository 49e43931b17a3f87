"""A zoo of small models, each paired with a loss and example data, for checks, tests and docs.

``ZOO`` maps a name ``"<model>/<loss>"`` (e.g. ``"mlp-relu/mse"``) to a
``ZooEntry``. Shapes are tiny so that checking every entry in float32 and
float64 takes seconds on a CPU::

    entry = ZOO["cnn/cross-entropy"]
    model, loss, params, x, y = entry.example(seed=0, dtype=jnp.float32)
    fbp.check_gradients(model, loss, params, x, y)

Call ``example`` with float64 inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fbp.layers import (
    GELU,
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    LayerNorm,
    LeakyReLU,
    LogSoftmax,
    MaxPool2D,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)
from fbp.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy

BATCH = 4
NUM_CLASSES = 3


@dataclass(frozen=True)
class ZooEntry:
    """One model with one loss and factories for its example data.

    Attributes:
      model: a layer (usually a Sequential).
      loss: a loss from ``fbp.losses``.
      make_x: ``make_x(key, dtype) -> x``, a batch of inputs ``(BATCH, ...)``;
        ``dtype`` is the float dtype (integer inputs ignore it).
      make_y: ``make_y(key, dtype) -> y``, the matching targets ``(BATCH, ...)``.
    """

    model: Any
    loss: Any
    make_x: Callable[[jax.Array, Any], jax.Array]
    make_y: Callable[[jax.Array, Any], jax.Array]

    def example(self, seed: int = 0, dtype: Any = jnp.float32) -> tuple:
        """``(model, loss, params, x, y)``, all drawn from ``seed``; float params and x in ``dtype``."""
        key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(seed), 3)
        x = self.make_x(key_x, dtype)
        y = self.make_y(key_y, dtype)
        params = self.model.init(key_params, x)
        # layers whose params do not follow the input (Embedding's table) are cast too, so the
        # check runs at the precision asked for
        params = jax.tree_util.tree_map(
            lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )
        return self.model, self.loss, params, x, y


# --- example data -----------------------------------------------------------


def _normal(*shape: int) -> Callable:
    return lambda key, dtype: jax.random.normal(key, (BATCH, *shape), dtype)


def _labels(key, dtype):
    del dtype  # integer labels in [0, NUM_CLASSES)
    return jax.random.randint(key, (BATCH,), 0, NUM_CLASSES)


def _soft_labels(key, dtype):
    """Probabilities (BATCH, NUM_CLASSES): soft targets for SoftmaxCrossEntropy."""
    return jax.nn.softmax(jax.random.normal(key, (BATCH, NUM_CLASSES), dtype), axis=-1)


def _binary(*shape: int) -> Callable:
    return lambda key, dtype: jax.random.bernoulli(key, 0.5, (BATCH, *shape)).astype(dtype)


def _ids(key, dtype):
    del dtype  # token ids (BATCH, 5) from a vocabulary of 10
    return jax.random.randint(key, (BATCH, 5), 0, 10)


# --- models ----------------------------------------------------------------


def _mlp(activation, out: int) -> Sequential:
    return Sequential([Dense(8, weight_init="he"), activation, Dense(out)])


_HEADS = {
    "mse": (MSE(), 2, _normal(2)),
    "cross-entropy": (SoftmaxCrossEntropy(), NUM_CLASSES, _labels),
    "bce": (BinaryCrossEntropy(), 1, _binary(1)),
}


def _mlp_entries() -> dict[str, ZooEntry]:
    """Every activation in an MLP on (BATCH, 5) inputs: ReLU with every head, the others with one
    (each check compiles a few programs, so the zoo stays small enough to check in seconds)."""
    activations = {
        "relu": (ReLU(), ("mse", "cross-entropy", "bce")),
        "leaky-relu": (LeakyReLU(0.1), ("cross-entropy",)),
        "sigmoid": (Sigmoid(), ("bce",)),
        "tanh": (Tanh(), ("mse",)),
        "gelu": (GELU(), ("cross-entropy",)),
    }
    entries = {}
    for name, (activation, heads) in activations.items():
        for head in heads:
            loss, out, make_y = _HEADS[head]
            entries[f"mlp-{name}/{head}"] = ZooEntry(_mlp(activation, out), loss, _normal(5), make_y)
    return entries


def _build() -> dict[str, ZooEntry]:
    zoo = _mlp_entries()
    # softmax as a hidden layer (attention-like weights), and a log-softmax head
    zoo["mlp-softmax/mse"] = ZooEntry(
        Sequential([Dense(6), Softmax(), Dense(2)]), MSE(), _normal(5), _normal(2)
    )
    zoo["mlp-log-softmax/cross-entropy"] = ZooEntry(
        Sequential([Dense(8), Tanh(), Dropout(0.2), Dense(NUM_CLASSES), LogSoftmax()]),
        SoftmaxCrossEntropy(),
        _normal(5),
        _soft_labels,
    )
    # images (BATCH, 8, 8, 2) -> 8x8x3 -> overlapping max-pool 7x7x3 -> strided VALID conv
    # that leaves a row unused 3x3x4 -> overlapping avg-pool 2x2x4 -> 16 -> classes
    cnn = Sequential([
        Conv2D(3, kernel_size=3),
        ReLU(),
        MaxPool2D(2, stride=1),
        Conv2D(4, kernel_size=2, stride=2, padding="VALID"),
        Tanh(),
        AvgPool2D(2, stride=1),
        Flatten(),
        Dense(NUM_CLASSES),
    ])
    zoo["cnn/cross-entropy"] = ZooEntry(cnn, SoftmaxCrossEntropy(), _normal(8, 8, 2), _labels)
    # a pre-norm residual block between two dense layers
    block = Residual(Sequential([LayerNorm(), Dense(8), GELU(), Dense(6)]))
    for head in ("mse", "bce"):
        loss, out, make_y = _HEADS[head]
        model = Sequential([Dense(6), block, Dense(out)])
        zoo[f"residual-layernorm/{head}"] = ZooEntry(model, loss, _normal(5), make_y)
    # token ids (BATCH, 5) -> (BATCH, 5, 4) -> (BATCH, 20) -> classes
    embedding = Sequential([Embedding(10, 4), Flatten(num_axes=2), Dense(NUM_CLASSES)])
    zoo["embedding/cross-entropy"] = ZooEntry(embedding, SoftmaxCrossEntropy(), _ids, _labels)
    return zoo


ZOO: dict[str, ZooEntry] = _build()


def select(names: list[str] | None = None) -> dict[str, ZooEntry]:
    """The entries named, in zoo order; a model name without ``/loss`` selects all its losses.

    Raises:
      KeyError: a name matches no entry (the message lists the names).
    """
    if not names:
        return dict(ZOO)
    chosen = set()
    for name in names:
        matches = [key for key in ZOO if key == name or key.split("/")[0] == name]
        if not matches:
            raise KeyError(f"no zoo model {name!r}; known: {', '.join(ZOO)}")
        chosen.update(matches)
    return {key: entry for key, entry in ZOO.items() if key in chosen}
