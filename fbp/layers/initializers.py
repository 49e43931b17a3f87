"""Weight initializers by name, shared by every layer with a ``weight_init`` field."""

from __future__ import annotations

import jax

INITIALIZERS = {
    "he": jax.nn.initializers.he_normal,  # normal, variance 2 / fan_in: for ReLU nets
    "glorot": jax.nn.initializers.glorot_uniform,  # uniform, variance 2 / (fan_in + fan_out): tanh, sigmoid
    "lecun": jax.nn.initializers.lecun_normal,  # normal, variance 1 / fan_in
}


def check_weight_init(owner: str, name: str) -> None:
    """Raise ValueError unless ``name`` is a key of ``INITIALIZERS``; ``owner`` names the layer."""
    if name not in INITIALIZERS:
        raise ValueError(f"{owner}: weight_init must be one of {sorted(INITIALIZERS)}, got {name!r}")


def init_weight(name: str, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """A weight of ``shape`` drawn by the initializer ``name`` (fan-in: all axes but the last; fan-out: the last)."""
    return INITIALIZERS[name]()(key, shape, dtype)
