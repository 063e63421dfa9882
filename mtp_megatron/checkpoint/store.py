"""The checkpoint folder of a run: names, atomic commit, the ``latest`` marker, discovery and pruning.

Layout under ``<run.dir>/checkpoints``::

    iter_0000100/        a complete checkpoint: megatron-core's files plus our manifest.json
    iter_0000200.tmp/    a save in progress (or one that died): never read
    latest               the name of the newest committed checkpoint, rewritten atomically after each commit

A save writes into ``iter_N.tmp``; once every rank has finished, rank 0 writes ``manifest.json`` (every file with
its size), renames the folder to ``iter_N`` and only then updates ``latest``. A crash at any point leaves either
the previous state or the new complete one. Reading checks the manifest against the files, so a folder with a
missing or truncated file is reported by name (and skipped when resuming). Pure file-system code, no
torch.distributed: the caller decides which rank runs what.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Optional

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
FORMAT = "mtp-megatron-checkpoint/1"
_STEP_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the file or field and the fix."""


def step_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def step_of(path: str) -> Optional[int]:
    """The step of an ``iter_NNNNNNN`` folder, or None for any other name."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def temporary_path(final_path: str) -> str:
    return final_path + TMP_SUFFIX


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}{TMP_SUFFIX}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: str, step: int, info: dict) -> None:
    """Record every file of a finished save with its size (rank 0, after all ranks are done writing)."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(parent, name)
            files[os.path.relpath(full, folder)] = os.path.getsize(full)
    manifest = {"format": FORMAT, "step": step, **info, "files": dict(sorted(files.items()))}
    _write_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def commit(tmp_folder: str, final_folder: str, update_latest: bool = True) -> None:
    """Publish a finished save: rename ``iter_N.tmp`` to ``iter_N``, then point ``latest`` at it."""
    if os.path.exists(final_folder):  # the same step saved before (a rerun from an older checkpoint)
        _remove(final_folder)
    os.rename(tmp_folder, final_folder)
    root = os.path.dirname(final_folder)
    _fsync_dir(root)
    if update_latest:
        _write_atomically(os.path.join(root, LATEST), os.path.basename(final_folder) + "\n")


def problems(folder: str) -> list[str]:
    """What makes ``folder`` unusable as a checkpoint (empty when it is complete), each naming the file."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return [f"{folder} does not exist"]
    if not os.path.exists(manifest_path):
        return [f"{manifest_path} is missing (the save did not finish, or this is not an mtp-megatron checkpoint)"]
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        return [f"{manifest_path} is unreadable: {error}"]
    found = []
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            found.append(f"{path} is missing")
        elif os.path.getsize(path) != size:
            found.append(f"{path} has {os.path.getsize(path)} bytes, the save wrote {size} (truncated or replaced)")
    return found


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def verify(folder: str) -> None:
    """Raise CheckpointError naming every missing or damaged file of ``folder``."""
    found = problems(folder)
    if found:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete or damaged:\n  - " + "\n  - ".join(found)
            + "\nFix: point checkpoint.load at another iter_NNNNNNN folder (the run's older checkpoints are beside it)."
        )


def committed(root: str) -> list[str]:
    """The ``iter_NNNNNNN`` folders under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    names = [name for name in os.listdir(root) if step_of(name) is not None and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for name in sorted(names, key=step_of)]


def newest_complete(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root``; incomplete ones are skipped with a warning naming why."""
    for folder in reversed(committed(root)):
        found = problems(folder)
        if not found:
            return folder
        warnings.warn(f"skipping checkpoint {folder}: " + "; ".join(found), stacklevel=2)
    return None


def stale_temporaries(root: str) -> list[str]:
    """Folders of saves that never finished (``iter_N.tmp``)."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if name.endswith(TMP_SUFFIX) and step_of(name[: -len(TMP_SUFFIX)]) is not None)


def prune(root: str, keep: Optional[int]) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints; returns what was deleted."""
    if keep is None:
        return []
    complete = [folder for folder in committed(root) if not problems(folder)]
    doomed = complete[:-keep] if len(complete) > keep else []
    for folder in doomed:
        _remove(folder)
    return doomed


def _remove(folder: str) -> None:
    # The manifest goes first: a deletion cut short leaves a folder that reads as incomplete, never as complete.
    manifest = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
    shutil.rmtree(folder, ignore_errors=True)
