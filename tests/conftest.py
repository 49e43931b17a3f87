"""Shared test set-up: loud broadcasting, float32 / float64 without enabling x64 globally, fast compiles."""

import jax
import jax.numpy as jnp
import pytest

# accidental broadcasting between arrays of different rank is a bug here, not a feature
jax.config.update("jax_numpy_rank_promotion", "raise")

DTYPES = ("float32", "float64")


@pytest.fixture(params=DTYPES)
def dtype(request):
    """The float dtype of a test; float64 runs inside ``jax.enable_x64(True)`` for its duration."""
    with jax.enable_x64(request.param == "float64"):
        yield jnp.dtype(request.param)


@pytest.fixture
def x64():
    """Run the test in float64 (x64 enabled only for its duration)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def fast_compile(request):
    """XLA without its backend optimisation passes, for every test unless marked ``optimized``.

    Those passes are most of the compile time of the tiny programs the tests build
    (each layer x dtype x shape compiles anew) and buy nothing at these sizes; the
    suite is compile-bound. A test about what the optimised program does (speed,
    or bits that XLA's fusions decide) takes ``@pytest.mark.optimized``.
    Subprocesses (the console script as a user types it) compile as users do.
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", request.node.get_closest_marker("optimized") is None)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
