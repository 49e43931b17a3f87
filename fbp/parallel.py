"""Data parallelism on JAX's own sharding: one mesh, a sharded batch, replicated state.

    mesh = fbp.parallel.make_mesh(8)                   # the first 8 devices, one "data" axis
    step = fbp.make_train_step(model, loss, optimizer, mesh=mesh)
    state, metrics = step(state, x, y)                 # x: (global_batch, ...)

With a mesh the train step is ``jax.jit`` with shardings: the batch is split
along its leading axis over every device of the mesh, parameters and optimizer
state are replicated, and because the loss is a mean over the global batch, XLA
inserts the all-reduce that averages the gradient. The model code is unchanged,
and so are the results: they equal one device's on the same global batch, to
float tolerance (only the order of the summation differs).

Many hosts: call :func:`initialize` first in every process, then build the mesh
over all devices (``make_mesh()``). Every process calls the step with the same
global batch (the same data in the same order); each copies only its own
devices' slices. A global ``jax.Array`` already sharded like the step expects
(e.g. from ``jax.make_array_from_process_local_data``) is used as it is.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(num_devices: int | None = None, *, axis_name: str = AXIS) -> Mesh:
    """A one-axis mesh for data parallelism.

    Args:
      num_devices: how many devices, the first ones of ``jax.devices()``;
        None for all of them (all processes' devices after :func:`initialize`).
      axis_name: the mesh axis that the batch is split over.

    Returns:
      ``Mesh`` of shape ``(num_devices,)`` with one ``Auto`` axis, so the
      compiler places the collectives.
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(f"make_mesh: num_devices must be a positive int, got {num_devices!r}")
    if num_devices > len(devices):
        raise ValueError(
            f"make_mesh: asked for {num_devices} devices, but only {len(devices)} "
            f"{'is' if len(devices) == 1 else 'are'} visible ({devices[0].platform}). On a CPU, start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}; across hosts, call "
            "fbp.parallel.initialize() first."
        )
    return jax.make_mesh((num_devices,), (axis_name,), axis_types=(AxisType.Auto,), devices=devices[:num_devices])


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis ``batch_axis`` over every axis of ``mesh``; other axes whole on each device."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, x, batch_axis: int = 0) -> jax.Array:
    """Place ``x`` with its axis ``batch_axis`` split evenly over the devices of ``mesh``.

    Args:
      mesh: the mesh.
      x: an array (numpy or jax) holding the global batch along ``batch_axis``.
      batch_axis: 0 for one batch ``(batch, ...)``, 1 for a stack of batches
        ``(num_batches, batch, ...)``.

    Raises:
      ValueError: when the global batch does not divide by the number of devices.
    """
    shape = np.shape(x)
    if len(shape) <= batch_axis:
        raise ValueError(f"shard_batch: expected a batch axis at position {batch_axis}, got shape {shape}")
    batch = shape[batch_axis]
    if batch % mesh.size:
        raise ValueError(
            f"data parallel: the global batch of {batch} examples does not divide evenly across {mesh.size} "
            f"devices; use a batch size that is a multiple of {mesh.size} (e.g. {max(1, batch // mesh.size) * mesh.size})"
        )
    return _put(x, batch_sharding(mesh, batch_axis))


def replicate(mesh: Mesh, tree):
    """Copy every leaf of ``tree`` (params, a TrainState, ...) to every device of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, sharding), tree)


def _put(value, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    # Across processes: every process holds the same global value and fills its own devices.
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _from_env(value, name: str, cast=str):
    if value is not None or name not in os.environ:
        return value
    try:
        return cast(os.environ[name])
    except ValueError:
        raise ValueError(f"fbp.parallel.initialize: {name} must be an integer, got {os.environ[name]!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``); call before any other JAX work.

    Each argument left None is read from the environment: ``FBP_COORDINATOR``
    (``host:port`` of process 0), ``FBP_NUM_PROCESSES``, ``FBP_PROCESS_ID``.
    When all three are still None, JAX detects the cluster itself (Cloud TPU,
    SLURM, Open MPI, Kubernetes). Afterwards ``jax.devices()`` lists every
    process's devices and ``make_mesh()`` spans them all.

    Args:
      coordinator_address: ``"host:port"`` that every process can reach.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: restrict this process to these local devices.
    """
    coordinator_address = _from_env(coordinator_address, "FBP_COORDINATOR")
    num_processes = _from_env(num_processes, "FBP_NUM_PROCESSES", int)
    process_id = _from_env(process_id, "FBP_PROCESS_ID", int)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"fbp.parallel.initialize: num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"fbp.parallel.initialize: process_id must be in [0, {num_processes}) for {num_processes} processes, "
            f"got {process_id}"
        )
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need it to all-reduce
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
    )


def place(mesh: Mesh, state, x, y, batch_axis: int = 0):
    """``(state, x, y)`` as a data-parallel step takes them: state replicated, x and y split on ``batch_axis``.

    On CPU devices it first waits for ``state`` (the previous step's output), so one step is in flight:
    XLA's CPU runtime can deadlock when dozens of programs with all-reduces queue up on forced CPU
    devices that outnumber the cores (seen with 8 devices on 2 cores). GPUs and TPUs queue freely.
    """
    if mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        jax.block_until_ready(state)
    return replicate(mesh, state), shard_batch(mesh, x, batch_axis), shard_batch(mesh, y, batch_axis)


def jit_shardings(mesh: Mesh, batch_axis: int = 0) -> dict:
    """``in_shardings``/``out_shardings`` for ``jax.jit`` of ``f(state, x, y) -> (state, metrics)``."""
    batch = batch_sharding(mesh, batch_axis)
    return {"in_shardings": (replicated(mesh), batch, batch), "out_shardings": replicated(mesh)}
