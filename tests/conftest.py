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


# XLA without its backend optimisation passes, for the whole session: those passes are most of
# the compile time of the tiny programs the tests build (each layer x dtype x shape compiles
# anew) and buy nothing at these sizes; the suite is compile-bound. Set once for the session, so
# that module-scoped fixtures and the tests using them compile alike (a run and its resume must
# agree bit for bit). A test about what the optimised program does takes @pytest.mark.optimized.
# Subprocesses (the console script as a user types it) compile as users do.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _optimized_when_marked(request):
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)
