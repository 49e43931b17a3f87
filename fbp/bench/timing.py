"""How the benchmark times: interleaved rounds of calibrated calls, FLOP counts, memory, the matmul peak.

Every variant is built, compiled (the first call, timed: trace + compile + one
step) and warmed up; then rounds run the variants in turn (A B C, B C A, C A B,
...), so drift of the machine hits all alike. One measurement is ``n`` calls
dispatched back to back, then ``jax.block_until_ready``, with ``n`` calibrated
to about ``round_seconds``. A large matmul runs in the same rounds: its FLOP/s
is the peak that achieved FLOP/s are read against.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Variant:
    """One way to train a config (or the peak matmul): something to call and time.

    Attributes:
      name: the table's row name.
      call: runs one jitted call, asynchronously, keeping its own state.
      block: waits for the state of the last call.
      lower: returns ``jax.jit(...).lower(...)`` of one call (for memory), or None.
      steps_per_call: training steps that one call makes (an epoch makes many).
    """

    name: str
    call: Callable[[], None]
    block: Callable[[], None]
    lower: Callable[[], Any] | None = None
    steps_per_call: int = 1


def matmul_flops(fn: Callable, *args) -> int:
    """FLOPs of every dot_general and convolution in ``fn``'s jaxpr (2 per multiply-add)."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * out * math.prod(lhs[d] for d in contract)
            elif eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                total += 2 * out * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    total += count(inner)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _timed(variant: Variant, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        variant.call()
    variant.block()
    return time.perf_counter() - start


def _temp_bytes(variant: Variant) -> int | None:
    if variant.lower is None:
        return None
    try:
        compiled = variant.lower().compile()
        stats = getattr(compiled, "compiled", compiled).memory_analysis()  # Equinox wraps the Compiled
        return None if stats is None else int(stats.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, RuntimeError):  # no memory analysis here: report none
        return None


def measure(variants: list[Variant], rounds: int, round_seconds: float, log=print) -> dict[str, dict]:
    """Compile, warm up and calibrate each variant, then time them in interleaved rounds.

    Returns:
      {name: {"times": seconds per step for each round, "first_call_s", "temp_bytes"}}.
    """
    results, calls = {}, {}
    for v in variants:
        first = _timed(v, 1)  # trace + compile + one call
        _timed(v, 2)  # warm-up
        per_call = _timed(v, 3) / 3
        calls[v.name] = max(1, min(10_000, round(round_seconds / per_call)))
        results[v.name] = {"first_call_s": first, "temp_bytes": _temp_bytes(v), "times": []}
        log(f"  compiled {v.name}: first call {first:.2f} s, {per_call / v.steps_per_call * 1e3:.3f} ms/step")
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            n = calls[v.name]
            results[v.name]["times"].append(_timed(v, n) / (n * v.steps_per_call))
    return results


PEAK = "matmul peak"


def matmul_variant(dtype: str, size: int) -> Variant:
    """One ``(size, size) @ (size, size)`` matmul: timed in the rounds of every config, for its peak."""
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in jax.random.split(jax.random.PRNGKey(1), 2))
    matmul = jax.jit(jnp.matmul)
    out = [None]

    def call():
        out[0] = matmul(a, b)

    return Variant(PEAK, call, lambda: jax.block_until_ready(out[0]))


def summarize(facts: dict, raw: dict[str, dict], peak_size: int) -> tuple[list[dict], dict]:
    """One row per variant (medians, spread, ratios within rounds, FLOP/s), and the config's matmul peak.

    The fraction of peak is, like the ratios, the median over rounds of the
    fraction within a round: the matmul ran in the same rounds as the steps.
    """
    peak_times = raw.pop(PEAK)["times"]
    peak_flops = 2 * peak_size**3
    base = {name: raw[name]["times"] for name in ("raw-jax", "fbp manual")}
    rows = []
    for name, result in raw.items():
        times = result["times"]
        median = statistics.median(times)
        ratios = {
            f"vs {ref}": statistics.median(t / r for t, r in zip(times, ref_times)) for ref, ref_times in base.items()
        }
        fractions = [(facts["model_flops"] / t) / (peak_flops / p) for t, p in zip(times, peak_times)]
        rows.append({
            "variant": name,
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "times_s": times,
            **ratios,
            "steps_per_s": 1.0 / median,
            "compile_s": max(0.0, result["first_call_s"] - median),
            "temp_bytes": result["temp_bytes"],
            "flops_per_s": facts["model_flops"] / median,
            "peak_fraction": statistics.median(fractions),
        })
    peak = {"size": peak_size, "flops_per_s": peak_flops / statistics.median(peak_times)}
    return rows, peak
