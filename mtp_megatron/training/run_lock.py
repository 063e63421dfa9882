"""One live run per run folder: ``<run.dir>/run.lock``, taken by rank 0 before anything is written there.

Two jobs writing into one folder interleave their metrics and delete each other's in-progress saves, so the
second one is refused. The lock is a small JSON file created with ``O_EXCL`` and naming its holder (host, pid
and the pid's start time, Slurm job id, start and heartbeat times). A killed job cannot remove it, so a lock is
taken over, with a notice, when its holder is provably gone:

* the holder ran on this host and its process no longer exists (or the pid now belongs to another process);
* the holder is an earlier incarnation of this Slurm job (``scontrol requeue`` keeps the job id);
* the holder is on another host and its heartbeat, which a background thread rewrites every
  ``HEARTBEAT_SECONDS``, is older than ``LEASE_SECONDS`` (a node lost without a trace).

Everything else is a live holder, and the new run stops with a message naming it and the fix. File-system code
only: the caller decides which rank takes the lock and shares the verdict.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 600.0


class RunLockedError(RuntimeError):
    """Another live job holds the run folder; the message names it and the fix."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_record() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": now, "heartbeat": now}


def _describe(holder: dict) -> str:
    job = f"Slurm job {holder['slurm_job_id']}, " if holder.get("slurm_job_id") else ""
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"{job}pid {holder.get('pid')} on {holder.get('host')}, last heartbeat {age:.0f} s ago"


def stale_reason(holder: dict) -> Optional[str]:
    """Why ``holder`` (a lock file's content) can no longer be running, or None if it may be."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it is an earlier run of this Slurm job ({job})"
    if holder.get("host") == socket.gethostname():
        start = _process_start(int(holder.get("pid", -1)))
        if start is None:
            return f"its process {holder.get('pid')} on this host has exited"
        if holder.get("pid_start") is not None and start != holder["pid_start"]:
            return f"its pid {holder.get('pid')} now belongs to another process"
        return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > LEASE_SECONDS:
        return f"its heartbeat is {age:.0f} s old (lease {LEASE_SECONDS:.0f} s)"
    return None


class RunLock:
    """The lock of one run folder, held from ``acquire`` until ``release`` (a context manager too)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._record: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.notice: Optional[str] = None
        """Set when a stale lock was taken over: what was replaced, and why."""

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a holder may release (or a stale lock vanish) between our two looks
            record = _holder_record()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                reason = stale_reason(holder)
                if reason is None:
                    raise RunLockedError(
                        f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}). Fix: wait "
                        "for it to finish, stop it (touch <run.dir>/STOP), or choose another run.dir. If that run "
                        f"is certainly dead, delete {self.path}.")
                self.notice = f"took over {self.path} from {_describe(holder)}: {reason}"
                self._write(record)  # replace the stale holder; re-read below to be sure we won
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
            if self._read() == record:
                self._record = record
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
        raise RunLockedError(f"could not take {self.path}: another run keeps changing it. Fix: choose another "
                             "run.dir, or make sure only one job uses this one.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._record is not None and self._read() == self._record:
            os.remove(self.path)
        self._record = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if self._record is None or self._read() != self._record:
                return  # taken over by someone who judged us dead: leave it to them
            self._record = {**self._record, "heartbeat": time.time()}
            self._write(self._record)

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written by a holder killed mid-write: judge it by its age
            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                return None
            return {"host": None, "pid": -1, "heartbeat": time.time() - age}

    def _write(self, record: dict) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.path)
