"""The checkpoint folder of a run: names, atomic commit, checksums, the ``latest`` marker, resuming and rolling
back, pruning.

Layout under ``<run.dir>/checkpoints``::

    iter_0000100/        a complete checkpoint: megatron-core's files plus our manifest.json
    iter_0000200.tmp/    a save in progress (or one that died): never read
    latest               the checkpoint a restart continues from (see below)
    set_aside/<time>/    checkpoints moved out of the way by a rollback or a re-save: kept, never read
    rollbacks.jsonl      one line per rollback done (the target, when, what was set aside)

A save writes into ``iter_N.tmp``; once every rank has finished, rank 0 writes ``manifest.json`` (every file
with its size and CRC-32, which the ranks compute in parallel), renames the folder to ``iter_N`` and only then
updates ``latest``. A crash at any point leaves either the previous state or the new complete one. Reading checks
the manifest against the files, so a missing, truncated or corrupted file is named.

``latest`` names the checkpoint a restart continues from: the newest checkpoint of the run's current line of
training. Each commit points it at the new checkpoint. Rolling back moves it to an older one: either by naming
that checkpoint in ``checkpoint.load`` or by editing ``latest`` by hand. The checkpoints after the rollback target
(the abandoned line) are then moved to ``set_aside/`` (never deleted), so that pruning and later saves of the same
steps cannot mix the two lines. A checkpoint newer than ``latest`` whose manifest was written after ``latest`` was
last changed is a commit that died between the rename and the update of ``latest``: it is the newest one, not an
abandoned one.

Pure file-system code, no torch.distributed: the caller decides which rank runs what.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
import zlib
from typing import Iterable, Optional

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
SET_ASIDE = "set_aside"
ROLLBACKS = "rollbacks.jsonl"
FORMAT = "mtp-megatron-checkpoint/1"
_STEP_DIR = re.compile(r"^iter_(\d{7,})$")
_CHUNK = 16 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the file or field and the fix."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing file system); the message says where, why, and
    which checkpoint is the last complete one."""


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


# -- files and checksums ----------------------------------------------------------------------------------------

def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` as a relative path, sorted (the manifest excluded)."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, name), folder) for name in names]
    return sorted(name for name in found if name != MANIFEST)


def file_crc32(path: str) -> str:
    """The CRC-32 of a file, as 8 hex digits (catches corruption; about 1 GB/s per core)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` of ``world_size`` checksums or verifies (every ``world_size``-th)."""
    return names[rank::world_size]


def write_manifest(folder: str, step: int, info: dict, checksums: Optional[dict] = None) -> None:
    """Record every file of a finished save with its size and checksum (rank 0, after all ranks are done)."""
    checksums = checksums or {}
    files = {}
    for name in list_files(folder):
        files[name] = {"bytes": os.path.getsize(os.path.join(folder, name))}
        if name in checksums:
            files[name]["crc32"] = checksums[name]
    manifest = {"format": FORMAT, "step": step, **info, "files": files}
    _write_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def _expected(entry) -> tuple[int, Optional[str]]:
    """(size, crc32 or None) of a manifest entry (manifests before checksums held the size alone)."""
    if isinstance(entry, dict):
        return int(entry["bytes"]), entry.get("crc32")
    return int(entry), None


def problems(folder: str, names: Optional[Iterable[str]] = None, checksums: bool = False) -> list[str]:
    """What makes ``folder`` unusable as a checkpoint (empty when it is complete), each naming the file. ``names``
    limits the file checks to those manifest entries (a rank's share); ``checksums`` also reads and checks them."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return [f"{folder} does not exist"]
    if not os.path.exists(manifest_path):
        return [f"{manifest_path} is missing (the save did not finish, or this is not an mtp-megatron checkpoint)"]
    try:
        files = read_manifest(folder).get("files", {})
    except (OSError, ValueError) as error:
        return [f"{manifest_path} is unreadable: {error}"]
    found = []
    for name in (sorted(files) if names is None else names):
        size, crc = _expected(files[name])
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            found.append(f"{path} is missing")
        elif os.path.getsize(path) != size:
            found.append(f"{path} has {os.path.getsize(path)} bytes, the save wrote {size} (truncated or replaced)")
        elif checksums and crc is not None and file_crc32(path) != crc:
            found.append(f"{path} does not match its checksum (corrupted in place)")
    return found


def manifest_names(folder: str) -> list[str]:
    """The files the manifest of ``folder`` lists, sorted ([] without a readable manifest)."""
    try:
        return sorted(read_manifest(folder).get("files", {}))
    except (OSError, ValueError):
        return []


def verify(folder: str, checksums: bool = True) -> None:
    """Raise CheckpointError naming every missing or damaged file of ``folder`` (one process reads it all)."""
    found = problems(folder, checksums=checksums)
    if found:
        raise CheckpointError(damaged_message(folder, found))


def damaged_message(folder: str, found: list[str]) -> str:
    return (f"checkpoint {folder} is incomplete or damaged:\n  - " + "\n  - ".join(found)
            + "\nFix: point checkpoint.load at another iter_NNNNNNN folder (the run's older checkpoints are beside it).")


# -- committing -------------------------------------------------------------------------------------------------

def commit(tmp_folder: str, final_folder: str, update_latest: bool = True) -> Optional[str]:
    """Publish a finished save (its manifest written): rename ``iter_N.tmp`` to ``iter_N``, then point ``latest``
    at it. A folder of the same name (the same step saved before) is set aside first; returns where. A crash
    between the two renames leaves the complete ``iter_N.tmp``, which the next start commits
    (``finish_interrupted_commits``), and the old folder in ``set_aside/``: nothing is lost."""
    root = os.path.dirname(final_folder)
    moved = set_aside(root, [final_folder])[0] if os.path.exists(final_folder) else None
    _rename(tmp_folder, final_folder)
    if update_latest:
        write_latest(root, os.path.basename(final_folder))
    return moved


def _rename(source: str, destination: str) -> None:
    os.rename(source, destination)
    _fsync_dir(os.path.dirname(destination))


def finish_interrupted_commits(root: str) -> list[str]:
    """Commit the saves that finished and whose commit died before the rename: an ``iter_N.tmp`` with its
    manifest (rank 0 writes it only once every rank's files are written and checksummed) and every file of the
    size it lists. Returns the folders committed; ``latest`` is left as it is (``resume_line`` takes a checkpoint
    committed after ``latest`` last changed as the newest)."""
    done = []
    for folder in stale_temporaries(root):
        if os.path.exists(os.path.join(folder, MANIFEST)) and not problems(folder):
            final = folder[: -len(TMP_SUFFIX)]
            commit(folder, final, update_latest=False)
            done.append(final)
    return done


def read_latest(root: str) -> Optional[str]:
    """The checkpoint folder ``latest`` names (a full path), or None."""
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(root, name) if name else None


def write_latest(root: str, name: str) -> None:
    _write_atomically(os.path.join(root, LATEST), name + "\n")


# -- discovery --------------------------------------------------------------------------------------------------

def committed(root: str) -> list[str]:
    """The ``iter_NNNNNNN`` folders under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    names = [name for name in os.listdir(root) if step_of(name) is not None and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for name in sorted(names, key=step_of)]


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def resume_line(root: str) -> tuple[list[str], list[str]]:
    """(the checkpoints a restart may continue from, best first: ``latest``, then older ones by step;
    the checkpoints after ``latest`` that a rollback abandoned). See the module docstring."""
    folders = committed(root)
    latest = read_latest(root)
    if latest is None or latest not in folders:
        return folders[::-1], []
    newer = folders[folders.index(latest) + 1:]
    latest_written = _mtime(os.path.join(root, LATEST))
    # A newer checkpoint committed after latest last changed: its commit died before updating latest.
    unannounced = [f for f in newer if _mtime(os.path.join(f, MANIFEST)) > latest_written]
    if unannounced:
        return folders[::-1], []
    return folders[: folders.index(latest) + 1][::-1], newer


def newest_complete(root: str) -> Optional[str]:
    """The first complete checkpoint of ``resume_line`` (sizes checked); incomplete ones are skipped with a
    warning naming why."""
    for folder in resume_line(root)[0]:
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


# -- rolling back -----------------------------------------------------------------------------------------------

def set_aside(root: str, folders: list[str]) -> list[str]:
    """Move ``folders`` into ``root/set_aside/<time>/`` (kept for the user, never read); returns the new paths."""
    if not folders:
        return []
    target = os.path.join(root, SET_ASIDE, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    moved = []
    for folder in folders:
        destination = os.path.join(target, os.path.basename(folder))
        os.rename(folder, destination)
        moved.append(destination)
    _fsync_dir(root)
    return moved


def roll_back(root: str, target: str, abandoned: list[str]) -> list[str]:
    """Make ``target`` the checkpoint the run continues from: set ``abandoned`` aside, point ``latest`` at it and
    record the rollback. Returns where the abandoned checkpoints went."""
    moved = set_aside(root, abandoned)
    write_latest(root, os.path.basename(target))
    with open(os.path.join(root, ROLLBACKS), "a") as f:
        f.write(json.dumps({"target": os.path.basename(target), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "set_aside": moved}) + "\n")
    return moved


def rollback_done(root: str, target: str) -> Optional[dict]:
    """The record of an earlier rollback to ``target`` (a folder of ``root``), or None."""
    try:
        with open(os.path.join(root, ROLLBACKS)) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    matching = [r for r in records if r.get("target") == os.path.basename(os.path.normpath(target))]
    return matching[-1] if matching else None


def prune(root: str, keep: Optional[int]) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints of the current line; returns what was deleted."""
    if keep is None:
        return []
    complete = [folder for folder in resume_line(root)[0] if not problems(folder)][::-1]  # oldest first
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


def disk_full(error: BaseException, folder: str) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: ENOSPC, or torch's zip writer failing (its message
    hides the errno: "unexpected pos") while the file system has (almost) no space left."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        return shutil.disk_usage(parent or ".").free < 16 * 2**20
    except OSError:
        return False
