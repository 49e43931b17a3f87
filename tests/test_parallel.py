"""Data parallelism: ``fbp.parallel`` and ``make_train_step(mesh=...)``.

The multi-device checks run ``_parallel_worker.py`` in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 CPU devices, no
accelerator needed); this process keeps its single default device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parallel_worker import PLAN

import fbp
from fbp import parallel

WORKER = Path(__file__).with_name("_parallel_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 240  # generous for a loaded 2-core CI machine; a hang fails instead of blocking the run

# float32 sums over the batch in a different order across devices: a few ulps per step;
# two Adam steps at lr 1e-2 keep the parameters' share of that far below 1e-6
ATOL = {"params": 1e-6, "opt_state": 1e-6, "loss": 1e-5}


def _env(device_count: int, **variables: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **variables)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={device_count}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def equivalence() -> dict:
    """The worker's report: every PLAN case trained on meshes of 1-8 devices vs one device."""
    result = subprocess.run(
        [sys.executable, str(WORKER), "equivalence"],
        env=_env(8), capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    if result.returncode:
        pytest.fail(f"worker failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


ROWS = [(name, epoch, n) for name, epoch, device_counts in PLAN for n in device_counts]


@pytest.mark.parametrize("name,epoch,devices", ROWS, ids=[f"{c}-{'epoch' if e else 'step'}-{n}dev" for c, e, n in ROWS])
def test_mesh_matches_one_device(equivalence, name, epoch, devices):
    row = equivalence[name]["epoch" if epoch else "step"][str(devices)]
    for what, atol in ATOL.items():
        assert row[what] <= atol, f"{name} on {devices} devices: {what} differs from one device by {row[what]:.2e}"
    assert row["devices"] == devices and row["replicated"], "parameters should be replicated over the mesh"
    assert row["step"] == 2


def test_batch_is_split_evenly(equivalence):
    assert equivalence["x_shards"] == [[4, 8]] * 4


@pytest.mark.parametrize("where", ["step", "epoch"])
def test_indivisible_batch_names_both_numbers(equivalence, where):
    message = equivalence["errors"][where]
    assert message is not None, f"a batch of 10 on 4 devices should raise in the {where}"
    assert "10" in message and "4 devices" in message


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_finish_with_identical_parameters(tmp_path):
    """2 processes x 2 CPU devices, joined by fbp.parallel.initialize on localhost: one 4-device mesh."""
    port = _free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multiprocess", str(out)],
            env=_env(2, FBP_COORDINATOR=f"127.0.0.1:{port}", FBP_NUM_PROCESSES="2", FBP_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    try:
        logs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]
    first, second = (np.load(out) for out in outs)
    assert int(first["processes"]) == 2 and int(first["devices"]) == 4 and int(first["mesh_size"]) == 4
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)  # replicated: bit for bit
    for key in first.files:
        if key.startswith(("params_", "epoch_")):
            reference = first[f"reference_{key.split('_')[1]}"]
            np.testing.assert_allclose(first[key], reference, atol=ATOL["params"], err_msg=key)


# --- this process: one CPU device ---------------------------------------------------------


def test_make_mesh():
    mesh = parallel.make_mesh(1)
    assert mesh.size == 1 and mesh.axis_names == ("data",)
    assert parallel.make_mesh().size == jax.device_count()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_make_mesh_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive int"):
        parallel.make_mesh(bad)


def test_make_mesh_too_many_devices_says_how_to_get_them():
    wanted = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"asked for {wanted} devices.*xla_force_host_platform_device_count={wanted}"):
        parallel.make_mesh(wanted)


def test_mesh_of_one_device_matches_no_mesh():
    model = fbp.Sequential([fbp.Dense(8), fbp.ReLU(), fbp.Dense(3)])
    optimizer = optax.sgd(0.1)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5))
    y = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 3)
    params = model.init(jax.random.PRNGKey(2), x[0])
    results = []
    for mesh in (None, parallel.make_mesh(1)):
        step = fbp.make_train_step(model, fbp.SoftmaxCrossEntropy(), optimizer, per_example=True, clip_norm=1.0,
                                   mesh=mesh)
        state, _ = step(fbp.TrainState.create(params, optimizer), x[0], y[0])
        state, _ = fbp.train_epoch(step, state, x, y)
        results.append(state.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *results)


def test_shard_batch_needs_the_batch_axis():
    with pytest.raises(ValueError, match="batch axis at position 1"):
        parallel.shard_batch(parallel.make_mesh(1), jnp.zeros(4), batch_axis=1)


@pytest.fixture
def fake_distributed(monkeypatch):
    """Record the arguments of jax.distributed.initialize instead of joining a cluster."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    for name in ("FBP_COORDINATOR", "FBP_NUM_PROCESSES", "FBP_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_reads_the_environment(fake_distributed, monkeypatch):
    monkeypatch.setenv("FBP_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("FBP_NUM_PROCESSES", "4")
    monkeypatch.setenv("FBP_PROCESS_ID", "3")
    parallel.initialize()
    parallel.initialize(process_id=0)  # arguments win over the environment
    assert [args for args, _ in fake_distributed] == [("10.0.0.1:1234", 4, 3), ("10.0.0.1:1234", 4, 0)]


def test_initialize_without_settings_lets_jax_detect_the_cluster(fake_distributed):
    parallel.initialize()
    assert fake_distributed[0][0] == (None, None, None)


def test_initialize_rejects_bad_settings(fake_distributed, monkeypatch):
    monkeypatch.setenv("FBP_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="FBP_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize()
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\).*got 2"):
        parallel.initialize("127.0.0.1:1234", 2, 2)
    assert not fake_distributed
