"""What the benchmark measures: each config (a model spec, a batch size, a dtype) and the model it names.

A config's model is built four ways: by ``fbp.models.build`` (the model a user
of ``fbp train`` gets), in plain ``jax.numpy``/``lax`` (the raw-JAX floor), in
Flax NNX and in Equinox (the peers, imported only when their rows run).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fbp import models


@dataclasses.dataclass(frozen=True)
class Config:
    """One model and batch size.

    Attributes:
      name: the table's name for it.
      spec: the model as ``fbp.models`` spells it: ``"mlp:128,128"`` (Dense + ReLU per width, then a
        Dense to the classes) or ``"cnn:16,32"`` (3x3 Conv2D + ReLU + 2x2 MaxPool2D per width, then
        Flatten and a Dense to the classes).
      example_shape: one example, no batch axis: ``(in_features,)`` or an image ``(H, W, C)``.
      classes: the logits per example.
      batch: examples per step.
      dtype: params and inputs.
      num_batches: distinct batches the steps cycle through; one epoch for train_epoch.
      smoke: a config too small to judge any target on (the ``--quick`` one).
      precision: the train step's precision policy (``fbp.make_train_step(precision=...)``):
        ``"bfloat16"`` keeps float32 params and computes forward and backward in bfloat16.
    """

    name: str
    spec: str
    example_shape: tuple[int, ...]
    classes: int
    batch: int
    dtype: str = "float32"
    num_batches: int = 8
    smoke: bool = False
    precision: str = "float32"

    @property
    def compute_dtype(self) -> str:
        """The dtype the matmuls run in: ``dtype``, or the precision policy's compute dtype."""
        return self.dtype if self.precision == "float32" else self.precision

    @property
    def kind(self) -> str:
        """``"mlp"`` or ``"cnn"``."""
        return models.parse(self.spec)[0]

    @property
    def hidden(self) -> tuple[int, ...]:
        """The widths (mlp) or channels (cnn) of the spec."""
        return models.parse(self.spec)[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One batch of inputs: ``(batch, *example_shape)``."""
        return (self.batch, *self.example_shape)


CONFIGS = (
    Config("mlp 64-128-128-10 b32", "mlp:128,128", (64,), 10, 32, num_batches=64),
    Config("mlp 784-512-512-10 b128", "mlp:512,512", (784,), 10, 128),
    Config("mlp 784-512-512-10 b1024", "mlp:512,512", (784,), 10, 1024, num_batches=4),
    Config("cnn 28x28x1 16-32-10 b128", "cnn:16,32", (28, 28, 1), 10, 128),
)
# mixed precision (float32 params, bfloat16 compute): on CPU for correctness and cost, on an accelerator for speed
BF16 = Config("mlp 784-512-512-10 b1024 bf16", "mlp:512,512", (784,), 10, 1024, num_batches=4, precision="bfloat16")
QUICK = Config("mlp 8-16-4 b4", "mlp:16", (8,), 4, 4, num_batches=4, smoke=True)
SMALL, LARGE = CONFIGS[0].name, CONFIGS[2].name  # the configs that some targets speak of


def fbp_model(cfg: Config):
    """The config's model as ``fbp train`` builds it: ``fbp.models.build(cfg.spec, ...)``."""
    return models.build(cfg.spec, input_shape=cfg.example_shape, num_outputs=cfg.classes)


def raw_apply(cfg: Config, params: list, x: jax.Array) -> jax.Array:
    """The same model in plain jax.numpy / lax; ``params``: fbp's, without the empty entries."""
    *hidden, last = params
    for p in hidden:
        if cfg.kind == "mlp":
            x = jax.nn.relu(x @ p["W"] + p["b"])
        else:
            x = lax.conv_general_dilated(x, p["W"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + p["b"])
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.reshape(x.shape[0], -1) @ last["W"] + last["b"]


def _flat_features(cfg: Config) -> int:
    """The cnn's features after its last pool: each block halves H and W."""
    h, w, _ = cfg.example_shape
    blocks = len(cfg.hidden)
    return (h >> blocks) * (w >> blocks) * cfg.hidden[-1]


def _hidden_pairs(cfg: Config) -> list[tuple[int, int]]:
    """The mlp's hidden layers as (in_features, features): ``(in, h1), (h1, h2), ...``."""
    return list(itertools.pairwise((cfg.example_shape[0], *cfg.hidden)))


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def nnx_model(cfg: Config):
    """The model in Flax NNX (NHWC, as fbp)."""
    from flax import nnx

    rngs, dtype = nnx.Rngs(0), jnp.dtype(cfg.dtype)
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype, rngs=rngs)
    layers: list[Any] = []
    if cfg.kind == "mlp":
        for a, b in _hidden_pairs(cfg):
            layers += [linear(a, b), nnx.relu]
        return nnx.Sequential(*layers, linear(cfg.hidden[-1], cfg.classes))
    pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
    channels = cfg.example_shape[2]
    for c in cfg.hidden:
        layers += [nnx.Conv(channels, c, (3, 3), dtype=dtype, param_dtype=dtype, rngs=rngs), nnx.relu, pool]
        channels = c
    return nnx.Sequential(*layers, _flatten, linear(_flat_features(cfg), cfg.classes))


def equinox_model(cfg: Config):
    """The model in Equinox: modules take one example, NCHW for images, and are vmapped."""
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    dtype = jnp.dtype(cfg.dtype)
    relu = eqx.nn.Lambda(jax.nn.relu)
    layers: list[Any] = []
    if cfg.kind == "mlp":
        for a, b in _hidden_pairs(cfg):
            layers += [eqx.nn.Linear(a, b, key=next(keys), dtype=dtype), relu]
        return eqx.nn.Sequential([*layers, eqx.nn.Linear(cfg.hidden[-1], cfg.classes, key=next(keys), dtype=dtype)])
    channels = cfg.example_shape[2]
    for c in cfg.hidden:
        conv = eqx.nn.Conv2d(channels, c, 3, padding=1, key=next(keys), dtype=dtype)
        layers += [conv, relu, eqx.nn.MaxPool2d(2, 2)]
        channels = c
    head = eqx.nn.Linear(_flat_features(cfg), cfg.classes, key=next(keys), dtype=dtype)
    return eqx.nn.Sequential([*layers, eqx.nn.Lambda(jnp.ravel), head])
