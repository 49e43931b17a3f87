"""Train-step benchmark: fbp against a raw-JAX step, Flax NNX and Equinox, in one process.

    python -m benchmarks.train_step                  # every config: a few minutes on a 2-core CPU
    python -m benchmarks.train_step --quick          # one tiny config in seconds: the smoke test
    python -m benchmarks.train_step --results benchmarks/RESULTS.md   # also rewrite RESULTS.md

Method. Every variant of a config is built, compiled (the first call, timed:
trace + compile + one step) and warmed up; then rounds run the variants in
turn (A B C, B C A, C A B, ...), so drift of the machine hits all alike. One
measurement is ``n`` calls dispatched back to back, then
``jax.block_until_ready``, with ``n`` calibrated to about ``--round-seconds``.
Reported per variant: the median time per step over rounds and its spread
(min and max as a percentage of the median); ratios as the median over rounds
of the ratio within each round; temporary memory from
``jit(...).lower(...).compile().memory_analysis()``; achieved FLOP/s, the
matmul and convolution FLOPs of the raw-JAX gradient (counted in its jaxpr)
over the time, as a fraction of the FLOP/s of a large matmul that runs in the
same rounds.

Every step trains with Adam on softmax cross-entropy. The raw-JAX step is the
floor: ``jax.value_and_grad`` + optax, returning the loss and the gradient norm
as fbp's step does; fbp steps run with ``skip_nonfinite=False`` (the guarded
default is its own row). Flax NNX and Equinox steps are written as their docs
do (``nnx.jit``, ``eqx.filter_jit``) and return the loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

import fbp

# --- configs ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One model and batch size.

    Attributes:
      name: the table's name for it.
      kind: ``"mlp"`` (Dense + ReLU) or ``"cnn"`` (3x3 Conv2D + ReLU + 2x2 MaxPool per stage, then Dense).
      widths: mlp: ``(in_features, hidden..., classes)``; cnn: ``(channels per stage..., classes)``.
      batch: examples per step.
      image: the cnn's input ``(H, W, C)``.
      dtype: params and inputs.
      num_batches: distinct batches the steps cycle through; one epoch for train_epoch.
    """

    name: str
    kind: str
    widths: tuple[int, ...]
    batch: int
    image: tuple[int, int, int] = (28, 28, 1)
    dtype: str = "float32"
    num_batches: int = 8

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.widths[0]) if self.kind == "mlp" else (self.batch, *self.image)


CONFIGS = (
    Config("mlp 64-128-128-10 b32", "mlp", (64, 128, 128, 10), 32, num_batches=64),
    Config("mlp 784-512-512-10 b128", "mlp", (784, 512, 512, 10), 128),
    Config("mlp 784-512-512-10 b1024", "mlp", (784, 512, 512, 10), 1024, num_batches=4),
    Config("cnn 28x28x1 16-32-10 b128", "cnn", (16, 32, 10), 128),
)
BF16 = Config("mlp 784-512-512-10 b1024 bf16", "mlp", (784, 512, 512, 10), 1024, dtype="bfloat16", num_batches=4)
QUICK = (Config("mlp 8-16-4 b4", "mlp", (8, 16, 4), 4, num_batches=4),)
SMALL, LARGE = CONFIGS[0].name, CONFIGS[2].name  # the configs two targets speak of

# per-example gradients materialised by vmap: skip the reference rows past this many floats
VMAP_LIMIT = 1e8
CLIP_VMAP_LIMIT = 2e7


# --- the models, four ways ----------------------------------------------------


def fbp_model(cfg: Config) -> fbp.Sequential:
    """The config's model as fbp layers."""
    if cfg.kind == "mlp":
        hidden = [layer for w in cfg.widths[1:-1] for layer in (fbp.Dense(w, weight_init="he"), fbp.ReLU())]
        return fbp.Sequential([*hidden, fbp.Dense(cfg.widths[-1])])
    stages = [layer for c in cfg.widths[:-1] for layer in (fbp.Conv2D(c, 3), fbp.ReLU(), fbp.MaxPool2D(2))]
    return fbp.Sequential([*stages, fbp.Flatten(), fbp.Dense(cfg.widths[-1])])


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
    h, w, _ = cfg.image
    stages = len(cfg.widths) - 1
    return (h >> stages) * (w >> stages) * cfg.widths[-2]


def nnx_model(cfg: Config):
    """The model in Flax NNX (NHWC, as fbp)."""
    from flax import nnx

    rngs, dtype = nnx.Rngs(0), jnp.dtype(cfg.dtype)
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype, rngs=rngs)
    layers: list[Any] = []
    if cfg.kind == "mlp":
        for a, b in zip(cfg.widths[:-2], cfg.widths[1:-1]):
            layers += [linear(a, b), nnx.relu]
        return nnx.Sequential(*layers, linear(cfg.widths[-2], cfg.widths[-1]))
    pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
    channels = cfg.image[2]
    for c in cfg.widths[:-1]:
        layers += [nnx.Conv(channels, c, (3, 3), dtype=dtype, param_dtype=dtype, rngs=rngs), nnx.relu, pool]
        channels = c
    return nnx.Sequential(*layers, _flatten, linear(_flat_features(cfg), cfg.widths[-1]))


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def equinox_model(cfg: Config):
    """The model in Equinox: modules take one example, NCHW for images, and are vmapped."""
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    dtype = jnp.dtype(cfg.dtype)
    relu = eqx.nn.Lambda(jax.nn.relu)
    layers: list[Any] = []
    if cfg.kind == "mlp":
        for a, b in zip(cfg.widths[:-2], cfg.widths[1:-1]):
            layers += [eqx.nn.Linear(a, b, key=next(keys), dtype=dtype), relu]
        return eqx.nn.Sequential([*layers, eqx.nn.Linear(cfg.widths[-2], cfg.widths[-1], key=next(keys), dtype=dtype)])
    channels = cfg.image[2]
    for c in cfg.widths[:-1]:
        conv = eqx.nn.Conv2d(channels, c, 3, padding=1, key=next(keys), dtype=dtype)
        layers += [conv, relu, eqx.nn.MaxPool2d(2, 2)]
        channels = c
    head = eqx.nn.Linear(_flat_features(cfg), cfg.widths[-1], key=next(keys), dtype=dtype)
    return eqx.nn.Sequential([*layers, eqx.nn.Lambda(jnp.ravel), head])


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


# --- variants: one way each to run a training step ---------------------------


@dataclasses.dataclass
class Variant:
    """One way to train a config.

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


def _copy(tree):
    return jax.tree_util.tree_map(jnp.array, tree)


def raw_variant(cfg, params, optimizer, batches) -> Variant:
    """``jax.value_and_grad`` + optax, jitted with the state donated: the floor."""
    params = _copy([p for p in params if p])

    def loss_fn(params, x, y):
        return _cross_entropy(raw_apply(cfg, params, x), y)

    def step(params, opt_state, count, x, y):
        value, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, count + 1, metrics

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    state = [(params, optimizer.init(params), jnp.zeros((), jnp.int32))]
    cycle = itertools.cycle(batches)

    def call():
        *state[0], _ = jitted(*state[0], *next(cycle))

    return Variant("raw-jax", call, lambda: jax.block_until_ready(state[0]), lambda: jitted.lower(*state[0], *batches[0]))


def fbp_variant(name, model, loss, optimizer, params, batches, **options) -> Variant:
    """``fbp.make_train_step(..., **options)`` called in a Python loop."""
    step = fbp.make_train_step(model, loss, optimizer, **{"skip_nonfinite": False, **options})
    state = [fbp.TrainState.create(params, optimizer)]
    cycle = itertools.cycle(batches)

    def call():
        state[0], _ = step(state[0], *next(cycle))

    return Variant(name, call, lambda: jax.block_until_ready(state[0]), lambda: step.lower(state[0], *batches[0]))


def fbp_epoch_variant(model, loss, optimizer, params, batches) -> Variant:
    """``fbp.train_epoch``: every batch of the epoch in one compiled lax.scan."""
    step = fbp.make_train_step(model, loss, optimizer, skip_nonfinite=False)
    state = [fbp.TrainState.create(params, optimizer)]
    xs, ys = (jnp.stack(column) for column in zip(*batches))

    def call():
        state[0], _ = fbp.train_epoch(step, state[0], xs, ys)

    return Variant("fbp train_epoch", call, lambda: jax.block_until_ready(state[0]), steps_per_call=len(batches))


def nnx_variant(cfg, optimizer, batches) -> Variant:
    """Flax NNX: ``nnx.jit`` over a step that updates model and optimizer in place."""
    from flax import nnx

    model = nnx_model(cfg)
    nnx_optimizer = nnx.Optimizer(model, optimizer, wrt=nnx.Param)

    @nnx.jit
    def step(model, nnx_optimizer, x, y):
        value, grads = nnx.value_and_grad(lambda m: _cross_entropy(m(x), y))(model)
        nnx_optimizer.update(model, grads)
        return value

    cycle = itertools.cycle(batches)
    return Variant(
        "flax-nnx",
        lambda: step(model, nnx_optimizer, *next(cycle)),
        lambda: jax.block_until_ready(nnx.state(nnx_optimizer)),
        lambda: step.lower(model, nnx_optimizer, *batches[0]),
    )


def equinox_variant(cfg, optimizer, batches) -> Variant:
    """Equinox: ``eqx.filter_jit`` over ``filter_value_and_grad`` + optax, per-example modules vmapped."""
    import equinox as eqx

    if cfg.kind == "cnn":  # Equinox convolutions take one (C, H, W) image
        batches = [(jnp.moveaxis(x, -1, 1), y) for x, y in batches]
    model = equinox_model(cfg)
    state = [(model, optimizer.init(eqx.filter(model, eqx.is_array)))]

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(lambda m: _cross_entropy(jax.vmap(m)(x), y))(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    cycle = itertools.cycle(batches)

    def call():
        *state[0], _ = step(*state[0], *next(cycle))

    return Variant(
        "equinox", call, lambda: jax.block_until_ready(state[0]), lambda: step.lower(*state[0], *batches[0])
    )


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def build_variants(cfg: Config, frameworks: bool = True) -> tuple[list[Variant], dict]:
    """Every variant of a config, and facts about it (``model_flops``, ``num_params``)."""
    key_x, key_y, key_params = jax.random.split(jax.random.PRNGKey(0), 3)
    keys = zip(jax.random.split(key_x, cfg.num_batches), jax.random.split(key_y, cfg.num_batches))
    dtype = jnp.dtype(cfg.dtype)
    batches = [
        (jax.random.normal(kx, cfg.input_shape, dtype), jax.random.randint(ky, (cfg.batch,), 0, cfg.widths[-1]))
        for kx, ky in keys
    ]
    model, loss, optimizer = fbp_model(cfg), fbp.SoftmaxCrossEntropy(), optax.adam(1e-3)
    params = model.init(key_params, batches[0][0])
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    dense_params = [p for p in params if p]
    flops = matmul_flops(
        jax.grad(lambda p, x, y: _cross_entropy(raw_apply(cfg, p, x), y)), dense_params, *batches[0]
    )
    common = (model, loss, optimizer, params, batches)
    variants = [
        raw_variant(cfg, params, optimizer, batches),
        fbp_variant("fbp manual", *common),
        fbp_variant("fbp manual, skip_nonfinite", *common, skip_nonfinite=True),
        fbp_variant("fbp autodiff", *common, grad="autodiff"),
        fbp_variant("fbp custom_vjp", *common, grad="custom_vjp"),
        fbp_variant("fbp per_example", *common, per_example=True),
        fbp_variant("fbp per_example + clip", *common, per_example=True, clip_norm=1.0),
    ]
    if cfg.batch * num_params <= VMAP_LIMIT:
        variants.append(fbp_variant("fbp per_example (vmap)", *common, per_example="vmap"))
    if cfg.batch * num_params <= CLIP_VMAP_LIMIT:
        variants.append(fbp_variant("fbp per_example + clip (vmap)", *common, per_example="vmap", clip_norm=1.0))
    variants.append(fbp_epoch_variant(*common))
    if frameworks and _installed("flax.nnx"):
        variants.append(nnx_variant(cfg, optimizer, batches))
    if frameworks and _installed("equinox"):
        variants.append(equinox_variant(cfg, optimizer, batches))
    return variants, {"model_flops": flops, "num_params": num_params}


# --- measuring ----------------------------------------------------------------


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


# --- targets --------------------------------------------------------------------


def evaluate_targets(configs: list[dict]) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    targets = []

    def add(target, config, value, goal, met):
        targets.append({"target": target, "config": config, "measured": value, "goal": goal, "met": bool(met)})

    for entry in configs:
        name, rows = entry["config"]["name"], {row["variant"]: row for row in entry["rows"]}
        manual = rows["fbp manual"]
        add("fbp manual / raw-jax", name, manual["vs raw-jax"], "<= 1.02", manual["vs raw-jax"] <= 1.02)
        pe = rows["fbp per_example"]
        add("per_example / batch step", name, pe["vs fbp manual"], "<= 1.10", pe["vs fbp manual"] <= 1.10)
        if pe["temp_bytes"] is not None and manual["temp_bytes"] is not None:
            more = pe["temp_bytes"] - manual["temp_bytes"]
            add("per_example temp memory - batch step's (bytes)", name, more, "<= 0", more <= 0)
        clip = rows["fbp per_example + clip"]
        add("per_example + clip / batch step", name, clip["vs fbp manual"], "<= 1.5", clip["vs fbp manual"] <= 1.5)
        if name in (SMALL, QUICK[0].name):  # the quick run checks its only config
            for other in ("flax-nnx", "equinox"):
                if other in rows:
                    ratio = statistics.median(
                        m / o for m, o in zip(manual["times_s"], rows[other]["times_s"])
                    )
                    add(f"fbp manual / {other}", name, ratio, "< 1", ratio < 1)
            speedup = 1.0 / rows["fbp train_epoch"]["vs fbp manual"]
            add("train_epoch steps/s / Python loop's", name, speedup, ">= 3", speedup >= 3)
        if name in (LARGE, QUICK[0].name):
            add("fbp manual FLOP/s / matmul peak", name, manual["peak_fraction"], ">= 0.85",
                manual["peak_fraction"] >= 0.85)
    return targets


# --- report ----------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU's model name where Linux tells it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load_average() -> float | None:
    """The host's 1-minute load average (other work competing for the cores), where the OS tells it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment() -> dict:
    """Device, versions, date: what a result needs to be read later."""
    device = jax.devices()[0]

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": jax.default_backend(),
        "device": device.platform if device.device_kind == device.platform else f"{device.platform} {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} {_cpu_model()}".strip(),
        "python": platform.python_version(),
        "versions": {**{p: version(p) for p in ("jax", "jaxlib", "optax", "flax", "equinox")}, "fbp": fbp.__version__},
    }


def _format_ratio(value: float) -> str:
    return f"{value:.2f}x"


NOTES = "## Notes (hand-written)"  # kept when --results rewrites the file: the tables change, the reading stays
BUSY_HOST = (
    "- **The host was busy** (load average above its core count): other work shared the cores, so times "
    "and spreads are noisy; ratios within rounds suffer less"
)
NO_ACCELERATOR = (
    "- No GPU or TPU was visible to JAX: the bfloat16 config (run by default on an accelerator, or with "
    "`--bf16`) is not in these tables"
)


def to_markdown(report: dict) -> str:
    """The report as markdown: environment, targets, one table per config."""
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Train-step benchmark",
        "",
        f"- Date: {env['date']}; command: `{report['command']}`",
        (
            f"- Device: {env['device']} (backend {env['backend']}, {env['device_count']} device(s)); "
            f"host: {env['machine']}, {env['cpu_count']} CPU cores; Python {env['python']}"
        ),
        f"- Versions: {versions}",
        (
            f"- Matmul peak: a {report['peak_size']}x{report['peak_size']} matmul in the config's dtype, timed "
            "in the same rounds as each config's steps (its GFLOP/s heads each table)"
        ),
        (
            f"- {report['rounds']} interleaved rounds of about {report['round_seconds']} s per variant; host "
            f"load average {report['load_average']['before']} before, {report['load_average']['after']} after"
        ),
        *([BUSY_HOST] if max(filter(None, report["load_average"].values()), default=0) > env["cpu_count"] else []),
        *([NO_ACCELERATOR] if env["backend"] == "cpu" and not any(
            entry["config"]["dtype"] == "bfloat16" for entry in report["configs"]) else []),
        "",
        "## Targets",
        "",
        "| target | config | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        value = t["measured"]
        shown = f"{value / 2**20:+.2f} MiB" if "bytes" in t["target"] else f"{value:.4f}"
        lines.append(f"| {t['target']} | {t['config']} | {shown} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    for entry in report["configs"]:
        cfg = entry["config"]
        lines += [
            "",
            f"## {cfg['name']}",
            "",
            (
                f"{entry['num_params']:,} parameters, {entry['model_flops'] / 1e6:.1f} MFLOP per step "
                f"(matmul/conv FLOPs of the raw-JAX gradient), dtype {cfg['dtype']}; matmul peak "
                f"{entry['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s in the same rounds."
            ),
            "",
            "| variant | ms/step | spread | vs raw-jax | vs fbp manual | steps/s | compile s | temp MiB | GFLOP/s | % peak |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in entry["rows"]:
            median = row["median_s"]
            spread = f"-{(1 - row['min_s'] / median) * 100:.0f}/+{(row['max_s'] / median - 1) * 100:.0f}%"
            temp = "n/a" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.2f}"
            lines.append(
                f"| {row['variant']} | {median * 1e3:.3f} | {spread} | {_format_ratio(row['vs raw-jax'])} "
                f"| {_format_ratio(row['vs fbp manual'])} | {row['steps_per_s']:.0f} | {row['compile_s']:.2f} "
                f"| {temp} | {row['flops_per_s'] / 1e9:.1f} | {row['peak_fraction'] * 100:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run_benchmark(configs, *, rounds: int, round_seconds: float, peak_size: int, frameworks: bool = True,
                  command: str = "", log=print) -> dict:
    """Measure every config; returns the report (what the JSON file holds)."""
    log(f"device: {jax.devices()[0]}")
    load_before = _load_average()
    entries = []
    for cfg in configs:
        log(f"{cfg.name}:")
        variants, facts = build_variants(cfg, frameworks)
        results = measure([*variants, matmul_variant(cfg.dtype, peak_size)], rounds, round_seconds, log=log)
        rows, peak = summarize(facts, results, peak_size)
        entries.append({"config": dataclasses.asdict(cfg), **facts, "peak": peak, "rows": rows})
        for row in rows:
            log(f"    {row['variant']:32s} {row['median_s'] * 1e3:9.3f} ms  {row['vs fbp manual']:.2f}x manual")
    return {
        "environment": environment(),
        "command": command,
        "rounds": rounds,
        "round_seconds": round_seconds,
        "load_average": {"before": load_before, "after": _load_average()},
        "peak_size": peak_size,
        "configs": entries,
        "targets": evaluate_targets(entries),
    }


# --- command line --------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (shared by ``python -m benchmarks.train_step`` and ``fbp bench``)."""
    names = [cfg.name for cfg in (*CONFIGS, BF16)]
    parser.add_argument("--quick", action="store_true", help="one tiny config, 2 short rounds: a smoke test")
    parser.add_argument("--config", action="append", metavar="NAME", choices=names,
                        help=f"run only this config (repeatable); one of: {'; '.join(names)}")
    parser.add_argument("--bf16", action="store_true",
                        help="add the bfloat16 config (added by default on a GPU or TPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7; 2 with --quick)")
    parser.add_argument("--round-seconds", type=float, help="time per variant per round (default 0.25)")
    parser.add_argument("--no-frameworks", action="store_true", help="skip Flax NNX and Equinox")
    parser.add_argument("--out", default="benchmarks/out", help="folder for train_step.json and train_step.md")
    parser.add_argument("--results", metavar="PATH",
                        help=f"also write the markdown here (benchmarks/RESULTS.md), keeping its '{NOTES}' section")
    return parser


def _command_line(args: argparse.Namespace) -> str:
    """The options that shape the numbers, as a command to rerun."""
    words = ["python -m benchmarks.train_step"]
    words += ["--quick"] * args.quick + ["--bf16"] * args.bf16 + ["--no-frameworks"] * args.no_frameworks
    words += [f"--config '{name}'" for name in args.config or ()]
    words += [f"--rounds {args.rounds}"] * (args.rounds is not None)
    words += [f"--round-seconds {args.round_seconds}"] * (args.round_seconds is not None)
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as the options say; write the JSON and markdown files."""
    configs = list(QUICK if args.quick else CONFIGS)
    if args.config:
        configs = [cfg for cfg in (*CONFIGS, BF16) if cfg.name in args.config]
    elif not args.quick and (args.bf16 or jax.default_backend() != "cpu"):
        configs.append(BF16)
    rounds = args.rounds or (2 if args.quick else 7)
    round_seconds = args.round_seconds or (0.01 if args.quick else 0.25)
    report = run_benchmark(
        configs,
        rounds=rounds,
        round_seconds=round_seconds,
        peak_size=256 if args.quick else 2048 if jax.default_backend() == "cpu" else 8192,
        frameworks=not args.no_frameworks,
        command=_command_line(args),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report)
    (out / "train_step.md").write_text(markdown)
    if args.results:
        results = Path(args.results)
        notes = results.read_text().partition(NOTES)[2] if results.is_file() else ""
        results.write_text(markdown + (f"\n{NOTES}{notes}" if notes else ""))
    print(markdown)
    print(f"wrote {out / 'train_step.json'} and {out / 'train_step.md'}" + (f" and {args.results}" if args.results else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.train_step [options]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
