"""Runs in a subprocess for tests/test_parallel.py, which sets XLA_FLAGS (forced CPU devices) first.

    python tests/_parallel_worker.py equivalence        # prints one JSON object
    python tests/_parallel_worker.py multiprocess OUT   # FBP_COORDINATOR etc. set; writes OUT

``equivalence`` trains each case of ``PLAN`` on meshes of 1, 2, 4 and 8 devices
and on one device without a mesh, and reports the largest differences. ``multiprocess`` joins a
multi-process run through ``fbp.parallel.initialize``, trains on a mesh over
every process's devices, and saves its parameters and a one-device reference.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbp
from fbp import parallel

BATCH = 16  # divides by 1, 2, 4 and 8 devices
NUM_BATCHES = 2


def mlp(dropout: bool = False):
    hidden = [fbp.Dense(16), fbp.ReLU()] + ([fbp.Dropout(0.25)] if dropout else [])
    return fbp.Sequential([*hidden, fbp.Dense(4)])


def cnn():
    return fbp.Sequential([
        fbp.Conv2D(4, kernel_size=3), fbp.ReLU(), fbp.MaxPool2D(2), fbp.Flatten(), fbp.Dense(4),
    ])


# name -> (model factory, make_train_step keyword arguments)
CASES = {
    "manual": (mlp, {"grad": "manual"}),
    "autodiff": (mlp, {"grad": "autodiff"}),
    "custom_vjp": (mlp, {"grad": "custom_vjp"}),
    "per_example": (mlp, {"per_example": True}),
    "per_example+clip": (mlp, {"per_example": True, "clip_norm": 0.5}),
    "autodiff+per_example+clip": (mlp, {"grad": "autodiff", "per_example": True, "clip_norm": 0.5}),
    "dp_noise": (mlp, {"per_example": True, "clip_norm": 0.5, "noise_multiplier": 1.0}),
    "dropout": (lambda: mlp(dropout=True), {}),
    "cnn": (cnn, {}),
}
# (case, train_epoch?, device counts): the gradient modes on every count, the rest on 8 (compiles are the cost)
PLAN = [
    *[(name, False, (1, 2, 4, 8)) for name in ("manual", "autodiff", "per_example+clip", "autodiff+per_example+clip")],
    *[(name, False, (8,)) for name in ("custom_vjp", "per_example", "dp_noise", "dropout", "cnn")],
    ("manual", True, (2, 8)),
    ("per_example+clip", True, (8,)),
]


def data(model, seed: int = 0):
    """``xs, ys``: ``(NUM_BATCHES, BATCH, ...)`` inputs and integer labels in [0, 4)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    shape = (NUM_BATCHES, BATCH, 6, 6, 2) if isinstance(model.layers[0], fbp.Conv2D) else (NUM_BATCHES, BATCH, 8)
    return jax.random.normal(kx, shape), jax.random.randint(ky, shape[:2], 0, 4)


def train(name: str, mesh=None, epoch: bool = False):
    """Train case ``name`` on every batch, step by step or as one ``train_epoch``; returns (state, losses)."""
    make_model, options = CASES[name]
    model = make_model()
    xs, ys = data(model)
    optimizer = optax.adam(1e-2)
    params = model.init(jax.random.PRNGKey(1), xs[0])
    state = fbp.TrainState.create(params, optimizer, rng=jax.random.PRNGKey(2))
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, mesh=mesh, **options)
    if epoch:
        state, metrics = fbp.train_epoch(step, state, xs, ys)
        return state, np.asarray(metrics["loss"])
    losses = []
    for x, y in zip(xs, ys):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def _max_diff(a, b) -> float:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    return float(max(leaves))


def equivalence() -> dict:
    """``{case: {"step"|"epoch": {devices: {...}}}}``: max |difference| to one device, and sharding facts."""
    results = {}
    for name, epoch, device_counts in PLAN:
        reference, reference_losses = train(name, epoch=epoch)
        rows = {}
        for n in device_counts:
            state, losses = train(name, parallel.make_mesh(n), epoch=epoch)
            leaf = jax.tree_util.tree_leaves(state.params)[0]
            rows[n] = {
                "params": _max_diff(state.params, reference.params),
                "opt_state": _max_diff(state.opt_state, reference.opt_state),
                "loss": float(np.max(np.abs(losses - reference_losses))),
                "devices": len(leaf.sharding.device_set),
                "replicated": bool(leaf.sharding.is_fully_replicated),
                "step": int(state.step),
            }
        results.setdefault(name, {})["epoch" if epoch else "step"] = rows
    results["errors"] = _errors()
    results["x_shards"] = _x_shards()
    return results


def _errors() -> dict:
    """The messages for a global batch that does not divide by the devices, per step and per epoch."""
    model = mlp()
    optimizer = optax.sgd(0.1)
    state = fbp.TrainState.create(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8))), optimizer)
    step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, mesh=parallel.make_mesh(4))
    messages = {}
    for where, call in {
        "step": lambda: step(state, jnp.zeros((10, 8)), jnp.zeros((10,), jnp.int32)),
        "epoch": lambda: fbp.train_epoch(step, state, jnp.zeros((2, 10, 8)), jnp.zeros((2, 10), jnp.int32)),
    }.items():
        try:
            call()
            messages[where] = None
        except ValueError as error:
            messages[where] = str(error)
    return messages


def _x_shards() -> list:
    """Shapes of the per-device pieces of a batch of 16 on 4 devices."""
    x = parallel.shard_batch(parallel.make_mesh(4), jnp.zeros((16, 8)))
    return [list(shard.data.shape) for shard in x.addressable_shards]


def multiprocess(out: str) -> None:
    """Join the run described by FBP_* variables, train "per_example+clip" on every device, save the results."""
    parallel.initialize()
    mesh = parallel.make_mesh()
    state, losses = train("per_example+clip", mesh)
    epoch_state, _ = train("per_example+clip", mesh, epoch=True)
    reference, _ = train("per_example+clip")  # this process alone, one device, no mesh

    def local(tree):  # replicated: every device holds the whole value
        return [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree_util.tree_leaves(tree)]

    arrays = {f"params_{i}": a for i, a in enumerate(local(state.params))}
    arrays |= {f"epoch_{i}": a for i, a in enumerate(local(epoch_state.params))}
    arrays |= {f"reference_{i}": a for i, a in enumerate(local(reference.params))}
    np.savez(
        out, losses=losses, devices=jax.device_count(), local_devices=jax.local_device_count(),
        processes=jax.process_count(), mesh_size=mesh.size, **arrays,
    )


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    jax.config.update("jax_disable_most_optimizations", True)  # most of the compile time, none of the point here
    if sys.argv[1] == "equivalence":
        print(json.dumps(equivalence()))
    elif sys.argv[1] == "multiprocess":
        multiprocess(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}; expected 'equivalence' or 'multiprocess OUT'")
