"""fbp.training.checkpoint: exact round trips, keep-last-N, atomic saves, and clear errors for bad checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp.training import checkpoint
from fbp.training.checkpoint import CheckpointError


def _state(width=4, seed=0):
    model = fbp.Sequential([fbp.Dense(width), fbp.ReLU(), fbp.Dense(3)])
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((2, 5)))
    return fbp.TrainState.create(params, optax.adam(1e-3), rng=jax.random.PRNGKey(seed + 1))


def _assert_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(u, v)


def test_round_trip_is_exact(tmp_path):
    state = _state(seed=3)
    path = checkpoint.save(tmp_path, 7, state, metadata={"note": "hi"})
    assert path.name == "epoch_000007"
    restored, meta = checkpoint.restore(path, _state(seed=0))  # `like` only gives the shapes
    _assert_equal(restored, state)
    assert isinstance(restored, fbp.TrainState)
    assert meta["epoch"] == 7 and meta["metadata"] == {"note": "hi"}


def test_keeps_the_last_few_and_ignores_partial_saves(tmp_path):
    state = _state()
    for epoch in range(1, 6):
        checkpoint.save(tmp_path, epoch, state, keep=2)
    assert [epoch for epoch, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 5]
    (tmp_path / "epoch_000006" / "state").mkdir(parents=True)  # what a crash before meta.json leaves behind
    assert checkpoint.latest(tmp_path).name == "epoch_000005"
    checkpoint.save(tmp_path, 6, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000005", "epoch_000006"]
    assert checkpoint.read_meta(tmp_path / "epoch_000006")["epoch"] == 6
    assert checkpoint.latest(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.save(tmp_path, 7, state, keep=0)


def test_another_model_names_the_folder_and_the_leaves(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(width=4))
    with pytest.raises(CheckpointError, match="written for a different model") as info:
        checkpoint.restore(path, _state(width=8))
    message = str(info.value)
    assert str(path) in message
    assert "params[0]['W']: (5, 4) float32 in the checkpoint, (5, 8) float32 here" in message


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state())
    victim = _largest_file(path / "state")
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name} is truncated or corrupt: state/.* has {size // 2} bytes, "
                                              rf"{size} were written"):
        checkpoint.restore(path, _state())


def test_corrupt_checkpoint_same_size(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state())
    victim = _largest_file(path / "state")
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="differs from what was written"):
        checkpoint.restore(path, _state())


def test_missing_or_broken_meta(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state())
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read: meta.json is unreadable"):
        checkpoint.restore(path, _state())
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is incomplete: it has no meta.json"):
        checkpoint.restore(path, _state())
    (path / "meta.json").write_text(json.dumps({"epoch": 1}))
    with pytest.raises(CheckpointError, match="no leaves, sha256, files"):
        checkpoint.restore(path, _state())
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*epoch_000009"):
        checkpoint.restore(tmp_path / "epoch_000009", _state())


def test_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    # orbax-checkpoint refuses relative paths; fbp makes them absolute where they enter
    monkeypatch.chdir(tmp_path)
    state = _state(seed=2)
    path = checkpoint.save("runs/x/checkpoints", 1, state)
    assert path == tmp_path / "runs" / "x" / "checkpoints" / "epoch_000001"
    assert checkpoint.latest("runs/x/checkpoints") == path
    restored, _ = checkpoint.restore("runs/x/checkpoints/epoch_000001", _state())
    _assert_equal(restored, state)


def test_a_healthy_checkpoint_orbax_cannot_read_is_not_called_corrupt(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    path = checkpoint.save(tmp_path, 1, _state())

    def refuse(self, *args, **kwargs):
        raise PermissionError("permission denied")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", refuse)
    with pytest.raises(CheckpointError, match="cannot be read by orbax-checkpoint .* its files match") as info:
        checkpoint.restore(path, _state())
    assert "corrupt" not in str(info.value)
