"""Checkpoints: a TrainState saved with orbax-checkpoint's CheckpointManager, plus a SHA-256 manifest.

Layout under ``directory``::

    epoch_000003/state/       the TrainState (orbax StandardSave, written and committed by orbax)
    epoch_000003/meta.json    epoch, every leaf's shape and dtype, a SHA-256 of the arrays, the size and
                              SHA-256 of every file under state/, and the caller's metadata

orbax does the atomic save (a temporary folder renamed on commit), keeps the last
``keep`` epochs and finds the steps; fbp adds ``meta.json``, written after orbax
commits (itself by an atomic rename). A checkpoint counts only once its
``meta.json`` exists: a process killed between the two leaves a step that
``latest`` ignores and the next ``save`` removes, so resuming picks the last
checkpoint that was written whole.

Every path is made absolute here, where it enters (orbax refuses relative
paths). Errors say what went wrong: a checkpoint whose files disagree with its
manifest is "truncated or corrupt"; one that cannot be read (no meta.json, a
permission error, an orbax failure on files that match the manifest) says so
and why, never "corrupt".

Test hook: with the environment variable ``FBP_TEST_KILL_DURING_SAVE=<epoch>``,
``save`` kills its own process with SIGKILL after orbax has written that
epoch's arrays and before ``meta.json``, to test resuming after a crash mid-save.
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
PREFIX = "epoch"  # step folders are epoch_000003
_NAME = re.compile(rf"^{PREFIX}_(\d+)$")
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, unreadable, or written for another model."""


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


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


def _manager(directory: Path, keep: int | None = None):
    """An orbax CheckpointManager over ``directory`` (absolute), synchronous, naming steps ``epoch_000003``."""
    import orbax.checkpoint as ocp  # imported lazily: it takes a second

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=PREFIX, step_format_fixed_length=6, create=True,
        enable_async_checkpointing=False, cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options)


def _steps(directory: Path) -> list[tuple[int, Path]]:
    """Every step folder, complete or not, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a meta.json) in ``directory`` as ``(epoch, path)``, oldest first."""
    return [(epoch, path) for epoch, path in _steps(_absolute(directory)) if (path / META).is_file()]


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def is_checkpoint_folder_entry(name: str) -> bool:
    """Whether a file name in a checkpoint folder is one of ours (a step, or orbax's temporary or metadata files)."""
    return bool(_NAME.match(name)) or "orbax-checkpoint-tmp" in name or name.startswith(".partial-")


def save(directory: str | os.PathLike, epoch: int, state, *, metadata: dict | None = None, keep: int = 3) -> Path:
    """Save ``state`` as ``directory/epoch_<epoch>`` and delete all but the last ``keep`` checkpoints.

    Args:
      directory: the checkpoint folder (created if missing; relative paths are made absolute).
      epoch: the number of completed epochs; names the checkpoint.
      state: any pytree of arrays (a TrainState).
      metadata: JSON-serialisable extras (e.g. the run's config), returned by ``restore``.
      keep: how many complete checkpoints to keep (>= 1).

    Returns:
      The absolute path of the new checkpoint.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint.save: keep must be >= 1, got {keep!r}")
    import orbax.checkpoint as ocp

    directory = _absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for step, path in _steps(directory):  # an incomplete step (killed before meta.json), or this epoch again
        if step == epoch or not (path / META).is_file():
            shutil.rmtree(path)
    for stale in directory.glob(".partial-*"):  # what a save killed under fbp 0.1 left behind
        shutil.rmtree(stale, ignore_errors=True)
    state = jax.device_get(state)
    manager = _manager(directory, keep)
    try:
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    finally:
        manager.close()
    final = directory / f"{PREFIX}_{epoch:06d}"
    if os.environ.get(KILL_HOOK) == str(epoch):  # test hook, see the module docstring
        os.kill(os.getpid(), signal.SIGKILL)
    meta = {
        "epoch": epoch,
        "leaves": _describe_leaves(state),
        "sha256": _digest(state),
        "files": _file_manifest(final / "state"),
        "metadata": metadata or {},
    }
    partial = final / f".{META}.partial"
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, final / META)  # the commit: from here on the checkpoint counts
    return final


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of the checkpoint at ``path``; CheckpointError if it cannot be read."""
    path = _absolute(path)
    try:
        meta = json.loads((path / META).read_text())
        missing = [key for key in ("epoch", "leaves", "sha256", "files") if key not in meta]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {META} (a save that did not finish); "
                              "resume from an earlier checkpoint") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {META} is unreadable ({error})") from error
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


def _check_files(path: Path, written: dict) -> None:
    """Compare state/ with the manifest: the one check that may call a checkpoint corrupt."""
    try:
        files = _file_manifest(path / "state")
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    for name, (size, sha) in written.items():
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: state/{name} is missing")
        if files[name] != [size, sha]:
            got = files[name][0]
            what = f"has {got} bytes, {size} were written" if got != size else "differs from what was written (SHA-256)"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: state/{name} {what}")


def restore(path: str | os.PathLike, like) -> tuple[Any, dict]:
    """Restore the checkpoint at ``path`` into a state shaped like ``like``.

    Args:
      path: a checkpoint folder (``.../epoch_000003``), e.g. from ``latest``; relative paths are fine.
      like: a state with the expected structure, shapes and dtypes (a fresh
        TrainState of the same model and optimizer); its values are unused.

    Returns:
      ``(state, meta)``: the restored state, and meta with ``"epoch"`` and the
      ``"metadata"`` given to ``save``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointError: the checkpoint is incomplete, truncated or corrupt (its
        files disagree with its manifest), cannot be read, or holds another
        model's parameters (the message lists the leaves that differ).
    """
    import orbax.checkpoint as ocp

    path = _absolute(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = read_meta(path)
    differences = _differences(meta["leaves"], _describe_leaves(like))
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model or optimizer:\n  " + "\n  ".join(differences)
        )
    _check_files(path, meta["files"])
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), _dtype(a), sharding=getattr(a, "sharding", None)), like
    )
    manager = _manager(path.parent)
    try:
        restored = manager.restore(meta["epoch"], args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read by orbax-checkpoint {ocp.__version__} although its files match "
            f"what was written ({type(error).__name__}: {error}); was it written by another orbax version?"
        ) from error
    finally:
        manager.close()
    state = restored["state"]
    if _digest(state) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the SHA-256 in {META}")
    return state, meta
