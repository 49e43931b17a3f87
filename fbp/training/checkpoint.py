"""Checkpoints: a TrainState saved with orbax-checkpoint, atomically, keeping the last few.

Layout under ``directory``::

    epoch_000003/state/       the TrainState (orbax StandardCheckpointHandler)
    epoch_000003/meta.json    epoch, every leaf's shape and dtype, a SHA-256 of the arrays, metadata
    .partial-epoch_000004/    a save in progress (ignored; swept by the next save)

A save writes everything into ``.partial-epoch_N`` and then renames it to
``epoch_N`` (one atomic rename on POSIX), so a folder named ``epoch_N`` is
always complete: a process killed mid-save leaves only a partial folder, and
``latest`` returns the last complete checkpoint.

Test hook: with the environment variable ``FBP_TEST_KILL_DURING_SAVE=<epoch>``,
``save`` kills its own process with SIGKILL after writing the arrays of that
epoch and before the rename, to test resuming after a crash mid-save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np

KILL_HOOK = "FBP_TEST_KILL_DURING_SAVE"
_NAME = re.compile(r"^epoch_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or written for another model."""


def _leaves(state) -> list[tuple[str, Any]]:
    """(path, leaf) pairs with readable paths such as ``params[0]['W']``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(path).lstrip("."), leaf) for path, leaf in flat]


def _dtype(leaf) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _describe_leaves(state) -> dict[str, list]:
    return {path: [list(np.shape(leaf)), str(_dtype(leaf))] for path, leaf in _leaves(state)}


def _digest(state) -> str:
    h = hashlib.sha256()
    for path, leaf in _leaves(state):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``folder``: detects truncation before orbax reads."""
    manifest = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        manifest[file.relative_to(folder).as_posix()] = [file.stat().st_size, digest]
    return manifest


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: it takes a second

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(epoch, path)``, oldest first; [] if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save(directory: str | os.PathLike, epoch: int, state, *, metadata: dict | None = None, keep: int = 3) -> Path:
    """Save ``state`` as ``directory/epoch_<epoch>``, atomically, and delete all but the last ``keep``.

    Args:
      directory: the checkpoint folder (created if missing).
      epoch: the number of completed epochs; names the checkpoint.
      state: any pytree of arrays (a TrainState).
      metadata: JSON-serialisable extras (e.g. the run's config), returned by ``restore``.
      keep: how many complete checkpoints to keep (>= 1).

    Returns:
      The path of the new checkpoint.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.save: keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{epoch:06d}"
    partial, final = directory / f".partial-{name}", directory / name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    state = jax.device_get(state)
    _checkpointer().save(partial / "state", state)
    if os.environ.get(KILL_HOOK) == str(epoch):  # test hook, see the module docstring
        os.kill(os.getpid(), signal.SIGKILL)
    meta = {
        "epoch": epoch,
        "leaves": _describe_leaves(state),
        "sha256": _digest(state),
        "files": _file_manifest(partial / "state"),
        "metadata": metadata or {},
    }
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)  # the commit: from here on the checkpoint is complete
    for _, old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of the checkpoint at ``path``; CheckpointError if unreadable."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        missing = [key for key in ("epoch", "leaves", "sha256", "files") if key not in meta]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: cannot read meta.json ({error})") from error
    return meta


def _differences(saved: dict, expected: dict, limit: int = 5) -> list[str]:
    lines = []
    for path, (e_shape, e_dtype) in expected.items():
        if path not in saved:
            lines.append(f"{path}: missing from the checkpoint")
        elif saved[path] != [e_shape, e_dtype]:
            s_shape, s_dtype = saved[path]
            lines.append(f"{path}: {tuple(s_shape)} {s_dtype} in the checkpoint, {tuple(e_shape)} {e_dtype} here")
    lines += [f"{path}: in the checkpoint only" for path in saved if path not in expected]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def restore(path: str | os.PathLike, like) -> tuple[Any, dict]:
    """Restore the checkpoint at ``path`` into a state shaped like ``like``.

    Args:
      path: a checkpoint folder (``.../epoch_000003``), e.g. from ``latest``.
      like: a state with the expected structure, shapes and dtypes (a fresh
        TrainState of the same model and optimizer); its values are unused.

    Returns:
      ``(state, meta)``: the restored state, and meta with ``"epoch"`` and the
      ``"metadata"`` given to ``save``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointError: the checkpoint is truncated or corrupt, or holds another
        model's parameters (the message lists the leaves that differ).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = read_meta(path)
    differences = _differences(meta["leaves"], _describe_leaves(like))
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model or optimizer:\n  " + "\n  ".join(differences)
        )
    files = _file_manifest(path / "state")
    for name, (size, sha) in meta["files"].items():
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: state/{name} is missing")
        if files[name] != [size, sha]:
            got = files[name][0]
            what = f"has {got} bytes, {size} were written" if got != size else "differs from what was written (SHA-256)"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: state/{name} {what}")
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), _dtype(a), sharding=getattr(a, "sharding", None)), like
    )
    try:
        state = _checkpointer().restore(path / "state", abstract)
    except Exception as error:  # orbax and tensorstore raise many kinds; all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {type(error).__name__}: {error}") from error
    if _digest(state) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the SHA-256 in meta.json")
    return state, meta
