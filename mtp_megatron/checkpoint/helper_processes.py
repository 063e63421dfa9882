"""Make the checkpoint writer's helper processes die with their rank.

megatron-core's checkpoint writing (sync and async saves alike) starts helpers: a ``multiprocessing`` Manager
(spawned; it serves the queue the write results come back through, about 270 MB, for the life of the rank) and
forked writer processes. When a rank is killed (SIGKILL, the OOM killer, a lost node's job step torn down),
they are re-parented to init and live on, holding memory (on a GPU node possibly device memory) long after the
job. Linux's parent-death signal ends them with their rank: the Manager is started by us, with an initializer
that asks for it, before megatron-core would start its own, and every process forked from the rank's main
thread asks for it right after the fork.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_installed = False
_forking_from_main_thread = False


def _die_with_parent(expected_parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the request took effect


def _before_fork() -> None:
    global _forking_from_main_thread
    _forking_from_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # The signal fires when the forking *thread* ends: only children of the main thread, which ends with the rank.
    if _forking_from_main_thread:
        _die_with_parent()


def bind_helper_processes_to_this_rank() -> None:
    """Install both measures once per process (call before the first checkpoint save)."""
    global _installed
    if _installed:
        return
    _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_die_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._mtp_results_manager = manager  # keeps it alive as long as the module
